"""A rollout driving 20 real EdgeNodes (in-process: real refresh from KV and the object store,
real ORT, real SQLite windows and telemetry, real safety monitors): a good version reaches
every node, stage by stage, and no node's safety monitor mistakes noise for a breach."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from nats.js import JetStreamContext

from _edge_util import Keys, edge_config
from _nats import wait_until
from _rollout import wait_rollout
from slmops.cloud.rollout import RolloutConfig, RolloutRunner, RolloutStore, start_rollout
from slmops.edge.node import EdgeNode
from slmops.shared.server import EmbeddedServer

N = 20
TEXTS = ["alpha news today", "beta things here", "gamma rays now", "plain words", "alpha beta"]


async def _traffic(node: EdgeNode) -> None:
    while True:
        await node.predict(TEXTS)
        await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_real_nodes_follow_a_rollout_stage_by_stage_to_completion(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    keys = Keys(tmp_path / "keys")
    registry, (v1, _) = await keys.registry(js, fleet, 1, 2)
    model = v1.manifest.name
    # Real latencies on a shared machine are noisy; this test is about the flow, not speed.
    config = RolloutConfig(stages=[5, 25, 100], soak_s=0.3, min_samples=100, max_latency_ratio=20,
                           install_timeout_s=30)  # fmt: skip
    runner = RolloutRunner(js, interval=0.05)
    store = RolloutStore(js)
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                EdgeNode(
                    edge_config(
                        tmp_path,
                        keys,
                        fleet=fleet,
                        node=f"{fleet}-e{i}",
                        url=nats_server.url,
                        model=str(v1.path),
                        status_interval=0.5,
                    )
                )
            )
            for i in range(N)
        ]
        tg = await stack.enter_async_context(anyio.create_task_group())
        for node in nodes:
            tg.start_soon(_traffic, node)
        await tg.start(runner.run)
        await wait_until(
            lambda: len(runner.controller.live_nodes(fleet, 0)) == N, timeout=20, what="statuses"
        )
        await start_rollout(js, registry, store, fleet=fleet, version=2, model=model, config=config)

        state = await wait_rollout(
            store, fleet, lambda s: s.phase == "done", 60, 0.1, what="rollout finished"
        )
        assert state.status == "completed", (state.reason, state.gates)
        await wait_until(
            lambda: all(n.models.current is not None and n.models.current.ref.version == 2 for n in nodes),
            timeout=20,
            what="every node serving v2",
        )
        assert sum(1 for e in state.nodes.values() if e.stage == 0) == 1  # 5% of 20
        assert [n.safety.rollbacks for n in nodes] == [0] * N
        tg.cancel_scope.cancel()
