"""A rollout driving 20 real EdgeNodes (in-process: real refresh from KV and the object store,
real ORT, real SQLite windows and telemetry, real safety monitors): a good version reaches
every node, stage by stage, and no node's safety monitor mistakes noise for a breach."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from nats.js import JetStreamContext

from _edge_util import Keys
from _rollout import edge_nodes, roll_out_v2
from slmops.cloud.rollout import RolloutConfig, RolloutRunner
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
    _, (v1, _) = await keys.registry(js, fleet, 1, 2)
    model = v1.manifest.name
    # Real latencies on a shared machine are noisy; this test is about the flow, not speed.
    config = RolloutConfig(stages=[5, 25, 100], soak_s=0.3, min_samples=100, max_latency_ratio=20,
                           install_timeout_s=30)  # fmt: skip
    runner = RolloutRunner(js, interval=0.05)
    async with AsyncExitStack() as stack:
        nodes = await edge_nodes(stack, tmp_path, keys, fleet=fleet, url=nats_server.url, model=v1.path, n=N)
        tg = await stack.enter_async_context(anyio.create_task_group())
        for node in nodes:
            tg.start_soon(_traffic, node)
        await tg.start(runner.run)
        state = await roll_out_v2(js, runner, nodes, fleet=fleet, model=model, config=config, timeout=60)
        assert sum(1 for e in state.nodes.values() if e.stage == 0) == 1  # 5% of 20
        assert [n.safety.rollbacks for n in nodes] == [0] * N
        tg.cancel_scope.cancel()
