"""The optional quality set of a generation model (issue 19): exact-match / containment cases
in the manifest, run once by each node after it installed the model (greedy, real
onnxruntime-genai on the suite's tiny decoder), reported in the node's status, and the
rollout's ``quality`` gate judging the canary nodes' score against ``min_quality``. The gate
inside a whole staged rollout is in ``test_generation_rollout.py``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from _decoder import held_out_prompts, make_generation_bundle_for_tests, quality_cases_for, with_quality

from _edge_util import Keys, edge_config
from slmops.cloud.config import RolloutConfig
from slmops.cloud.factory.genai import GenerationImportRefused
from slmops.cloud.rollout.gates import quality_gate
from slmops.cloud.rollout.nodes import quality_of
from slmops.edge.errors import Busy
from slmops.edge.node import EdgeNode
from slmops.shared.generation import quality_passed
from slmops.shared.messages import GenerationQualityCase, QualityScore


def test_exact_match_and_containment() -> None:
    exact = GenerationQualityCase(prompt="p", expect=" Paris ", match="exact")
    contains = GenerationQualityCase(prompt="p", expect="PARIS")
    assert quality_passed("Paris\n", exact)
    assert not quality_passed("Paris is the capital", exact)
    assert quality_passed("The capital is paris.", contains)
    assert not quality_passed("Lyon", contains)


@pytest.mark.anyio
async def test_a_node_runs_the_quality_set_once_and_the_gate_judges_its_score(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "plain", keys.key)
    prompts = held_out_prompts(3)
    cases = quality_cases_for(plain, prompts)
    wrong = GenerationQualityCase(prompt=prompts[2], expect="zebra xylophone quartz", match="exact")
    bundle = with_quality(plain, tmp_path / "q", keys.key, [*cases[:2], wrong])
    ref = bundle.manifest.ref
    async with EdgeNode(edge_config(tmp_path, keys, fleet=fleet, model=bundle.path)) as node:
        with anyio.fail_after(60):
            while not node.generations.quality_scores([ref]):  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.05)
        status = node._snapshot("periodic")
        assert await node.generations.run_quality(node.models.all()[0]) == status.quality[0]  # once
        await _a_running_quality_set_counts_against_the_queue(node, monkeypatch)
    assert status.quality == [QualityScore(model=ref, passed=2, total=3)]
    score = quality_of(status, ref.name, ref.version)
    assert quality_of(status, ref.name, ref.version + 1) is None

    # The gate: 2 of 3 against 0.8 fails, against 0.6 passes, waits for a silent canary node.
    failed = quality_gate(RolloutConfig(min_quality=0.8), {"n1": score})
    assert failed is not None
    assert (failed.outcome, failed.canary, failed.samples) == ("fail", 0.666667, 3), failed
    assert "2 of 3 quality cases passed on 1 canary nodes (n1 2/3)" in failed.detail
    passed = quality_gate(RolloutConfig(min_quality=0.6), {"n1": score})
    assert passed is not None
    assert passed.outcome == "pass"
    waiting = quality_gate(RolloutConfig(min_quality=0.6), {"n1": score, "n2": None})
    assert waiting is not None
    assert (waiting.outcome, waiting.detail) == ("waiting", "waiting: quality set run on 1/2 canary nodes")
    assert quality_gate(RolloutConfig(), {"n1": score}) is None  # optional: off by default
    # A version whose variant has no quality set: its nodes never report one, so the gate
    # fails at once rather than waiting.
    none = quality_gate(RolloutConfig(min_quality=0.5), {"n1": None}, missing="fp32")
    assert none is not None
    assert none.outcome == "fail"
    assert "variant(s) fp32 have none" in none.detail


async def _a_running_quality_set_counts_against_the_queue(
    node: EdgeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a quality set runs (it holds the one generation slot, default limits) it counts as
    running: 8 requests wait (``max_queue``), the 9th is refused ``Busy`` (HTTP 429). Old code:
    the run was not counted in ``running``, so every request was let wait (30 of 30)."""
    gens = node.generations
    active = node.models.all()[0]
    assert (gens.limits.max_concurrent, gens.limits.max_queue) == (1, 8)
    gens._quality.clear()  # run the set again, its first case held until the queue is full
    go = threading.Event()
    real = active.session.run_quality

    def held(cases: Any) -> int:
        go.wait(60)
        return real(cases)

    monkeypatch.setattr(active.session, "run_quality", held)

    async def wait_and_close() -> None:
        stream = await gens.open("hello")
        await stream.aclose()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gens.run_quality, active)
            while gens.statistics().running < 1:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.01)
            for _ in range(8):
                tg.start_soon(wait_and_close)
            while gens.statistics().waiting < 8:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.01)
            with pytest.raises(Busy, match="1 generations running and 8 waiting"):
                await gens.open("hello")
            go.set()
    stats = gens.statistics()
    assert (stats.running, stats.waiting, stats.refused_busy, stats.cancelled) == (0, 0, 1, 8)


def test_bad_quality_sets_and_thresholds_are_refused(tiny_decoder: Path, tmp_path: Path, keys: Keys) -> None:
    for bad in (
        GenerationQualityCase(prompt="p", expect="x", match="regex"),
        GenerationQualityCase(prompt="p", expect="  "),
        GenerationQualityCase(prompt="p", expect="x", max_new_tokens=0),
    ):
        with pytest.raises(GenerationImportRefused, match=r"quality\[0\]"):
            make_generation_bundle_for_tests(tiny_decoder, tmp_path / "bad", keys.key, quality=[bad])
    for q in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="min_quality"):
            RolloutConfig(min_quality=q)
