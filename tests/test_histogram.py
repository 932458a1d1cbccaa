"""Histogram merge laws (exact, associative, commutative, identity) and binning rules."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.shared import histogram as histogram_module
from slmops.shared.histogram import Histogram, HistogramMismatch

EDGES = [0.0, 1.0, 2.5, 10.0]
hists = st.lists(st.integers(-1000, 10**9), min_size=3, max_size=3).map(
    lambda c: Histogram(edges=EDGES, counts=c)
)


@given(hists, hists, hists)
def test_merge_is_associative(a: Histogram, b: Histogram, c: Histogram) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@given(hists, hists)
def test_merge_is_commutative(a: Histogram, b: Histogram) -> None:
    assert a.merge(b) == b.merge(a)


@given(hists)
def test_empty_is_the_identity(a: Histogram) -> None:
    assert a.merge(Histogram.empty(EDGES)) == a


@given(st.lists(st.floats(-100, 100, allow_nan=False), max_size=50))
def test_every_value_is_counted_once_even_out_of_range(values: list[float]) -> None:
    assert Histogram.of(EDGES, values).total == len(values)


def test_bins_are_left_closed() -> None:
    h = Histogram.of(EDGES, [0.0, 1.0, 2.49, 2.5, 10.0, -5.0])
    assert h.counts == [2, 2, 2]


def test_merging_different_edges_is_refused() -> None:
    with pytest.raises(HistogramMismatch, match="different edges"):
        Histogram.empty(EDGES).merge(Histogram.empty([0.0, 1.0]))


@pytest.mark.parametrize(
    ("edges", "counts", "rule"),
    [
        ([0.0], [], "at least 2 edges"),
        ([1.0, 0.0], [0], "increase strictly"),
        ([0.0, 1.0], [1, 2], "needs 1"),
    ],
)
def test_invalid_histograms_are_rejected_naming_the_rule(
    edges: list[float], counts: list[int], rule: str
) -> None:
    with pytest.raises(ValueError, match=rule):
        Histogram(edges=edges, counts=counts)


def test_edges_checked_once_still_reject_bad_ones_on_every_decode() -> None:
    """The per-edges-tuple check cache holds valid edges only and stays bounded: bad edges
    fail every time (decoded or built), valid ones keep checking the count length."""
    good = msgspec.msgpack.encode(Histogram(edges=EDGES, counts=[1, 2, 3]))
    assert msgspec.msgpack.decode(good, type=Histogram).counts == [1, 2, 3]
    bad = msgspec.msgpack.encode({"edges": [0.0, 2.0, 1.0], "counts": [1, 2]})
    for _ in range(2):
        with pytest.raises(msgspec.ValidationError, match="increase strictly"):
            msgspec.msgpack.decode(bad, type=Histogram)
    short = msgspec.msgpack.encode({"edges": EDGES, "counts": [1]})
    with pytest.raises(msgspec.ValidationError, match="needs 3"):
        msgspec.msgpack.decode(short, type=Histogram)
    for i in range(2 * histogram_module._VALID_EDGES_MAX):
        Histogram.empty([0.0, float(i + 1)])
    assert len(histogram_module._VALID_EDGES) <= histogram_module._VALID_EDGES_MAX


def test_quantile_interpolates_inside_the_bin() -> None:
    h = Histogram(edges=[0.0, 10.0, 20.0], counts=[50, 50])
    assert h.quantile(0.5) == pytest.approx(10.0)
    assert h.quantile(0.75) == pytest.approx(15.0)


def test_a_quantile_in_the_catch_all_last_bin_is_its_lower_edge() -> None:
    """A p95 that falls in an open-ended top bin (100 ms .. 1e6 ms) is reported as 100 ms, a
    lower bound: interpolating there made a "p95 of 809 s" out of a few slow requests."""
    h = Histogram(edges=[0.0, 50.0, 100.0, 1e6], counts=[80, 10, 10])
    assert h.quantile(0.95) == pytest.approx(100.0)
    assert h.quantile(0.85) == pytest.approx(75.0)  # a bounded bin still interpolates
    top = Histogram(edges=[0.0, 0.5, 0.9, 1.0], counts=[0, 50, 50])
    assert top.quantile(0.75) == pytest.approx(0.95)  # [0.9, 1.0] is not a catch-all
