"""Window aggregation, merge laws, outbox compaction and the privacy filter (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.edge.privacy import EventRow, add_noise, derive_rows, suppress, two_sided_geometric
from slmops.edge.window import ModelInfo, Windower, build_aggregate, compact, merge, mergeable, next_tick
from slmops.shared.histogram import Histogram, bin_index
from slmops.shared.messages import HistogramEdges, ModelRef, Privacy, TelemetryAggregate

EDGES = HistogramEdges(
    confidence=[0.0, 0.5, 0.8, 1.0], input_length=[0, 4, 16, 1000], latency_ms=[0, 1, 10, 1e6]
)
INFO = ModelInfo(model_id=1, ref=ModelRef(name="m", version=1), labels=["a", "b", "c"], edges=EDGES)

cells = st.lists(
    st.tuples(
        st.integers(-1, 2),
        st.integers(0, 2),
        st.integers(0, 2),
        st.integers(0, 2),
        st.integers(0, 1),
        st.integers(1, 50),
    ),
    max_size=12,
)
feedback = st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abc"), st.integers(1, 5)), max_size=4)


def agg(
    seq: int, cs: list[tuple[int, int, int, int, int, int]], fb: list[tuple[str, str, int]] = ()
) -> TelemetryAggregate:  # type: ignore[assignment]
    return build_aggregate(
        fleet="f",
        node="n",
        info=INFO,
        seq=seq,
        start=seq * 10.0,
        end=seq * 10.0 + 10,
        cells=cs,
        feedback=fb,
        k=1,
    )


aggregates = st.builds(agg, st.integers(1, 100), cells, feedback)


def canon(a: TelemetryAggregate) -> TelemetryAggregate:
    """Drop zero entries so equal content compares equal."""
    return msgspec.structs.replace(
        a,
        seq=0,
        class_counts={k: v for k, v in a.class_counts.items() if v},
        feedback={t: {p: n for p, n in r.items() if n} for t, r in a.feedback.items() if any(r.values())},
    )


def test_build_counts_every_inference_and_errors_once() -> None:
    """count = all cells; errors = flagged or unknown-class cells; histograms hold the rest."""
    a = agg(1, [(0, 2, 1, 0, 0, 3), (1, 0, 0, 2, 0, 2), (-1, 0, 0, 0, 1, 4), (7, 0, 0, 0, 0, 1)])
    assert a.count == 10
    assert a.errors == 5
    assert a.class_counts == {"a": 3, "b": 2}
    assert a.confidence.counts == [2, 0, 3]
    assert a.input_length.counts == [2, 3, 0]
    assert a.latency_ms.counts == [3, 0, 2]


@settings(max_examples=60, deadline=None)
@given(aggregates, aggregates, aggregates)
def test_merge_is_associative_and_commutative(
    a: TelemetryAggregate, b: TelemetryAggregate, c: TelemetryAggregate
) -> None:
    """Merging adds counts: the order and grouping of merges never matter."""
    assert canon(merge(a, b)) == canon(merge(b, a))
    assert canon(merge(merge(a, b), c)) == canon(merge(a, merge(b, c)))
    m = merge(a, b)
    assert m.count == a.count + b.count
    assert m.windows == 2
    assert m.window_start == min(a.window_start, b.window_start)


def test_merge_refuses_other_models_or_privacy() -> None:
    a = agg(1, [(0, 0, 0, 0, 0, 1)])
    other_model = msgspec.structs.replace(a, model=ModelRef(name="m", version=2))
    other_privacy = msgspec.structs.replace(a, privacy=Privacy(k=1, epsilon=1.0, mechanism="geometric"))
    for b in (other_model, other_privacy):
        assert not mergeable(a, b)
        with pytest.raises(ValueError, match="cannot be merged"):
            merge(a, b)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(cells, st.booleans()), min_size=1, max_size=12), st.integers(0, 6000))
def test_compact_keeps_every_count_or_a_receipt(spec: list[tuple[list, bool]], budget: int) -> None:  # type: ignore[type-arg]
    """Compaction fits the budget (or empties), renumbers contiguously from the first seq,
    and every inference is either still counted or in a loss receipt."""
    pending = []
    for i, (cs, other) in enumerate(spec):
        a = agg(5 + i, cs)
        if other:
            a = msgspec.structs.replace(a, model=ModelRef(name="m", version=9))
        pending.append(a)
    before = sum(a.count + a.dropped_inferences for a in pending)
    out = compact(pending, budget)
    kept = out.aggregates
    assert [a.seq for a in kept] == list(range(5, 5 + len(kept)))
    from slmops.shared.messages import encode_telemetry

    assert not kept or sum(len(encode_telemetry(a)) for a in kept) <= budget
    after = sum(a.count + a.dropped_inferences for a in kept) + out.carry_inferences
    assert after == before
    assert out.dropped_inferences == sum(a.count for a in pending) - sum(a.count for a in kept)


def test_compact_merges_before_dropping() -> None:
    """With room for one merged aggregate, nothing is dropped."""
    pending = [agg(1 + i, [(0, 0, 0, 0, 0, 1)]) for i in range(8)]
    from slmops.shared.messages import encode_telemetry

    one = len(encode_telemetry(pending[0]))
    out = compact(pending, one + 40)
    assert out.dropped_aggregates == 0
    assert len(out.aggregates) == 1
    assert out.aggregates[0].count == 8
    assert out.aggregates[0].windows == 8


def test_next_tick_is_the_next_boundary() -> None:
    assert next_tick(10.0, 5.0) == 15.0
    assert next_tick(12.3, 5.0) == 15.0
    assert next_tick(0.0, 0.25) == 0.25


@pytest.mark.anyio
async def test_windower_closes_at_boundaries_of_the_injected_clock() -> None:
    """The loop sleeps until each boundary of the (fake) clock, then calls close(now)."""
    now = [100.2]
    closed: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        await anyio.lowlevel.checkpoint()

    async def close(t: float) -> int:
        closed.append(t)
        return 1

    w = Windower(1.0, close, clock=lambda: now[0], sleep=sleep)
    with anyio.move_on_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run)
            while len(closed) < 3:
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert closed[:3] == pytest.approx([101.0, 102.0, 103.0])
    assert w.closed >= 3


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.floats(0, 1), st.integers(0, 10_000)), min_size=1, max_size=10),
    st.floats(0, 1e4),
)
def test_event_rows_hold_only_numbers_binned_like_histograms(
    preds: list[tuple[int, float, int]], latency: float
) -> None:
    """An event row is made of small numbers (no field can carry text), and its bins are the
    ones ``shared.histogram.bin_index`` gives."""
    idx, conf, lengths = zip(*preds, strict=True)
    rows = derive_rows(
        list(idx), list(conf), list(lengths), t=1.0, model_id=7, edges=EDGES, latency_ms=latency
    )
    assert len(rows) == len(preds)
    for row, (i, c, n) in zip(rows, preds, strict=True):
        assert isinstance(row, EventRow)
        assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in row)
        assert row.label == i
        assert row.conf_bin == bin_index(EDGES.confidence, c)
        assert row.len_bin == bin_index(EDGES.input_length, n)
        assert row.lat_bin == bin_index(EDGES.latency_ms, latency)


def test_geometric_noise_is_integer_centred_and_scaled() -> None:
    rng = np.random.default_rng(1)
    draws = two_sided_geometric(rng, 0.5, 20_000)
    assert all(isinstance(d, int) for d in draws)
    assert abs(float(np.mean(draws))) < 0.05
    # Var of two-sided geometric = 2a/(1-a)^2 = 4 at a = 0.5
    assert float(np.var(draws)) == pytest.approx(4.0, rel=0.1)
    with pytest.raises(ValueError, match="alpha"):
        two_sided_geometric(rng, 1.0, 3)


def test_noise_keeps_exact_count_and_states_the_mechanism() -> None:
    a = agg(1, [(0, 1, 1, 1, 0, 30), (1, 2, 0, 0, 0, 20)], [("a", "b", 2)])
    noisy = add_noise(a, 1.0, np.random.default_rng(3), INFO.labels)
    assert noisy.count == a.count
    assert noisy.errors == a.errors
    assert noisy.privacy == Privacy(k=1, epsilon=1.0, mechanism="geometric")
    assert noisy.confidence.edges == a.confidence.edges
    # every label and feedback cell is published, zeros included (absent keys would tell)
    assert set(noisy.class_counts) == {"a", "b", "c"}
    assert set(noisy.feedback) == {"a", "b", "c"}
    assert all(set(row) == {"a", "b", "c"} for row in noisy.feedback.values())
    hidden = suppress(a)
    assert hidden.count == a.count
    assert hidden.class_counts == {}
    assert hidden.confidence.total == 0
    assert hidden.privacy.mechanism == "suppressed"


def test_aggregate_times_are_utc() -> None:
    a = agg(3, [(0, 0, 0, 0, 0, 1)])
    assert a.window_start == datetime.fromtimestamp(30.0, UTC)
    assert isinstance(a.confidence, Histogram)
