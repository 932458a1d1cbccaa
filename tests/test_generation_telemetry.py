"""Generation telemetry (issue 19), without a node: the event row packs only bins and flags;
aggregates of generation rows count every answer once in every histogram, merge by adding
(any order), get DP noise on every generation count and are emptied by ``suppress``; the
cloud reads the generation signals (answer length, empty and refusal shares) and their
references from the manifest."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _decoder import make_generation_bundle_for_tests
from hypothesis import given, settings
from hypothesis import strategies as st

from _edge_util import Keys
from slmops.cloud.drift.signals import extract, manifest_refs
from slmops.edge.privacy import EventRow, add_noise, generation_row, suppress, unpack_generation
from slmops.edge.window import ModelInfo, build_aggregate, merge
from slmops.shared.messages import STOP_REASONS, GenerationEdges, HistogramEdges, ModelRef, TelemetryAggregate

LABELS = ["eos", "stop", "length", "cancelled"]
EDGES = HistogramEdges(
    confidence=[0, 0.02, 0.05, 1.01], input_length=[0, 8, 32, 1e6], latency_ms=[0, 5, 50, 1e6]
)
GEN = GenerationEdges(output_tokens=[0, 1, 4, 16, 1e6], tokens_per_s=[0, 10, 100, 1e9])
INFO = ModelInfo(
    model_id=1, ref=ModelRef(name="chat", version=1), labels=LABELS, edges=EDGES, generation=GEN,
    refusals=["not_able", "dont"],
)  # fmt: skip

row_args = st.fixed_dictionaries(
    {
        "reason": st.integers(0, 3),
        "loglik_bin": st.integers(-1, 2),
        "prompt_bin": st.integers(0, 2),
        "ttft_bin": st.integers(0, 2),
        "output_bin": st.integers(0, 3),
        "tps_bin": st.integers(0, 2),
        "empty": st.booleans(),
        "refusal": st.none() | st.integers(0, 1),
    }
)


def _agg(rows: list[EventRow], seq: int = 1) -> TelemetryAggregate:
    cells = Counter((r.label, r.conf_bin, r.len_bin, r.lat_bin, r.error, r.oos) for r in rows)
    return build_aggregate(
        fleet="f", node="n", info=INFO, seq=seq, start=0.0, end=1.0, k=1,
        cells=[(lb, cb, ln, lt, er, n, oos) for (lb, cb, ln, lt, er, oos), n in cells.items()],
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(row_args, max_size=40), st.integers(0, 5))
def test_generation_aggregates_count_every_answer_once_and_merge_by_adding(
    rows: list[dict[str, object]], errors: int
) -> None:
    made = [generation_row(t=0.0, model_id=1, **r) for r in rows]  # type: ignore[arg-type]
    for r, row in zip(rows, made, strict=True):
        assert unpack_generation(row.oos) == (
            r["output_bin"],
            r["tps_bin"],
            int(bool(r["empty"])),
            -1 if r["refusal"] is None else r["refusal"],
        )
    failed = [EventRow(0.0, 1, -1, 0, 0, 0, 1)] * errors
    agg = _agg(made + failed)
    gen = agg.generation
    assert gen is not None
    n = len(rows)
    assert (agg.count, agg.errors) == (n + errors, errors)
    assert sum(gen.stop_reasons.values()) == n + errors
    assert gen.stop_reasons["error"] == errors
    assert set(gen.stop_reasons) == set(STOP_REASONS)
    assert sum(agg.class_counts.values()) == n
    assert (
        agg.input_length.total
        == agg.latency_ms.total
        == gen.output_tokens.total
        == gen.tokens_per_s.total
        == n
    )
    assert agg.confidence.total == gen.loglik_sampled == sum(1 for r in rows if r["loglik_bin"] != -1)
    assert gen.empty == sum(1 for r in rows if r["empty"])
    assert sum(gen.refusals.values()) == sum(1 for r in rows if r["refusal"] is not None)
    # Merging the halves' aggregates is the aggregate of the whole, in either order.
    half = len(made) // 2
    a, b = _agg(made[:half] + failed, 1), _agg(made[half:], 2)
    for m in (merge(a, b), merge(b, a)):
        assert m.generation == gen
        assert (m.count, m.errors, m.class_counts) == (agg.count, agg.errors, agg.class_counts)


def test_dp_noise_covers_every_generation_count_and_suppress_empties_them() -> None:
    rows = [
        generation_row(t=0.0, model_id=1, reason=i % 4, loglik_bin=i % 3, prompt_bin=1, ttft_bin=1,
                       output_bin=i % 4, tps_bin=2, empty=i % 5 == 0, refusal=i % 2)
        for i in range(200)
    ]  # fmt: skip
    agg = _agg(rows)
    noisy = add_noise(agg, 1.0, np.random.default_rng(3), LABELS)
    gen, ngen = agg.generation, noisy.generation
    assert gen is not None
    assert ngen is not None
    assert noisy.privacy.mechanism == "geometric"
    assert noisy.privacy.sensitivity == 4 + 1 + 5  # common bins + feedback + the generation cells
    assert ngen.output_tokens.counts != gen.output_tokens.counts
    assert ngen.tokens_per_s.counts != gen.tokens_per_s.counts
    assert set(ngen.stop_reasons) == set(gen.stop_reasons)
    assert set(ngen.refusals) == set(gen.refusals)
    assert noisy.count == agg.count  # exact, the wire contract
    empty = suppress(agg).generation
    assert empty is not None
    assert empty.output_tokens.total == empty.tokens_per_s.total == 0
    assert (empty.stop_reasons, empty.refusals, empty.empty) == ({}, {}, 0)


def test_the_cloud_reads_generation_signals_and_their_manifest_references(
    tiny_decoder: Path, tmp_path: Path, keys: Keys
) -> None:
    bundle = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "b", keys.key)
    m = bundle.manifest
    spec = m.generation
    assert spec is not None
    assert spec.reference is not None
    refs = manifest_refs(m)
    assert {"class_prior", "confidence", "input_length", "output_tokens", "empty_output", "refusal"} <= set(
        refs
    )
    n = spec.reference_prompts
    assert refs["output_tokens"].n_ref == n
    # (``normalise`` smooths a reference by half a count per cell.)
    assert refs["refusal"].probs[0] == pytest.approx(sum(spec.reference.refusals.values()) / n, abs=0.02)
    assert refs["empty_output"].probs[0] == pytest.approx(spec.reference.empty / n, abs=0.02)
    rows = [
        generation_row(t=0.0, model_id=1, reason=0, loglik_bin=0, prompt_bin=0, ttft_bin=0,
                       output_bin=2, tps_bin=1, empty=i < 3, refusal=0 if i < 5 else None)
        for i in range(20)
    ]  # fmt: skip
    info = ModelInfo(
        model_id=1,
        ref=m.ref,
        labels=m.labels,
        edges=m.edges,
        generation=spec.edges,
        refusals=list(spec.refusals),
    )
    cells = Counter((r.label, r.conf_bin, r.len_bin, r.lat_bin, r.error, r.oos) for r in rows)
    agg = build_aggregate(
        fleet="f", node="n", info=info, seq=1, start=0.0, end=1.0, k=1,
        cells=[(lb, cb, ln, lt, er, c, oos) for (lb, cb, ln, lt, er, oos), c in cells.items()],
    )  # fmt: skip
    signals = extract(agg, m.labels, {"output_tokens": spec.edges.output_tokens})
    assert signals["empty_output"][0] == [3, 17]
    assert signals["refusal"][0] == [5, 15]
    assert sum(signals["output_tokens"][0]) == 20
    assert signals["class_prior"][0] == [20, 0, 0, 0]
    assert functools.reduce(lambda x, y: x + y, signals["input_length"][0]) == 20


def test_the_prompt_log_likelihood_read_matches_a_float64_log_softmax() -> None:
    from scipy.special import log_softmax

    from slmops.shared.generation import _log_softmax_at

    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(150, 3000)) * 8).astype(np.float32)
    targets = rng.integers(0, 3000, 150)
    want = log_softmax(logits.astype(np.float64), axis=1)[np.arange(150), targets]
    assert np.allclose(_log_softmax_at(logits, targets), want, atol=1e-5)
