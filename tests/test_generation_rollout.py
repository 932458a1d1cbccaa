"""A staged rollout of a second variant of the tiny decoder (issue 19), end to end: a real
nats-server, the cloud's registry and rollout runner, and two real EdgeNodes (in-process:
refresh from KV and the object store, onnxruntime-genai, SQLite windows, telemetry) serving
generation traffic. Stage 1 puts one node on version 2 beside one on version 1 (the control,
same period); the gates (error rate, time-to-first-token p95, tokens/s, likelihood,
stop-reason mix, and the quality set v2 carries, run by each canary node) pass and the rollout
completes with both nodes on version 2."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from _decoder import held_out_prompts, make_generation_bundle_for_tests, quality_cases_for, with_quality
from nats.js import JetStreamContext

from _edge_util import Keys
from _nats import model_of
from _rollout import edge_nodes, roll_out_v2
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import RolloutConfig, RolloutRunner
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import TrustStore
from slmops.shared.server import EmbeddedServer

PROMPTS = held_out_prompts(40)


async def _traffic(node: EdgeNode) -> None:
    i = 0
    while True:
        if node.models.current is not None:
            await node.generations.generate(PROMPTS[i % len(PROMPTS)], {"max_new_tokens": 12})
            i += 1
        else:
            await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.timeout(240)
async def test_a_staged_rollout_of_a_second_decoder_variant_passes_its_gates(
    nats_server: EmbeddedServer,
    js: JetStreamContext,
    fleet: str,
    tmp_path: Path,
    keys: Keys,
    tiny_decoder: Path,
    tiny_decoder_v2: Path,
) -> None:
    name = model_of(fleet)
    v1 = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "v1", keys.key, name=name, version=1)
    v2 = make_generation_bundle_for_tests(
        tiny_decoder_v2, tmp_path / "v2-plain", keys.key, name=name, version=2
    )
    # v2 carries a quality set (its own greedy answers: exact match, then containment) and the
    # rollout requires all of it on the canary nodes.
    v2 = with_quality(v2, tmp_path / "v2", keys.key, quality_cases_for(v2, PROMPTS[:2]))
    assert v1.manifest.files[1].sha256 != v2.manifest.files[1].sha256  # another model file
    registry = Registry(js)
    trust = TrustStore([keys.key.public_key()])
    for b in (v1, v2):
        await registry.push(b, trust)
    await registry.assign(fleet, 1, model=name)
    # Pace only: a 2 s soak instead of 120 s (the per-test timeout); every limit is the default.
    config = RolloutConfig(stages=[50, 100], soak_s=2.0, min_quality=1.0)
    runner = RolloutRunner(js, interval=0.2)
    async with AsyncExitStack() as stack:
        nodes = await edge_nodes(
            stack, tmp_path, keys, fleet=fleet, url=nats_server.url, model=v1.path, n=2, prefix="g"
        )
        tg = await stack.enter_async_context(anyio.create_task_group())
        for node in nodes:
            tg.start_soon(_traffic, node)
        await tg.start(runner.run)
        state = await roll_out_v2(js, runner, nodes, fleet=fleet, model=name, config=config, timeout=150)
        tg.cancel_scope.cancel()
    gates = state.gates
    quality = gates["quality"]
    assert isinstance(quality, dict)
    # The last stage's canaries: both nodes ran the 2 cases on v2 and passed them.
    assert (quality["outcome"], quality["canary"], quality["samples"]) == ("pass", 1.0, 4), quality
    judged = ("error_rate", "latency_p95", "tokens_per_s", "confidence", "drift")
    assert {"install", *judged} <= set(gates), gates
    for name in judged:
        gate = gates[name]
        assert isinstance(gate, dict)
        assert gate["outcome"] == "pass", gate
        assert gate["samples"] >= config.min_samples
        assert "control, same period" in gate["detail"] or name == "drift", gate  # judged against v1
