"""Fixed-edge histograms whose merge is exact: adding counts, in any order.

Bin ``i`` holds values ``edges[i] <= x < edges[i+1]``; values below the first edge land in bin
0 and values at or above the last edge in the last bin, so nothing observed is ever lost.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

import msgspec

__all__ = ["Histogram", "HistogramMismatch", "bin_index"]


class HistogramMismatch(ValueError):
    """Two histograms with different edges cannot be merged."""

    def __init__(self, left: Sequence[float], right: Sequence[float]) -> None:
        self.left = list(left)
        self.right = list(right)
        super().__init__(f"cannot merge histograms with different edges: {left!r} vs {right!r}")


def bin_index(edges: Sequence[float], value: float) -> int:
    """Index of the bin ``value`` falls in; out-of-range values clamp to the end bins."""
    nbins = len(edges) - 1
    i = bisect_right(edges, value) - 1
    return 0 if i < 0 else (nbins - 1 if i >= nbins else i)


#: Edges tuples already checked (valid ones only); bounded by ``_VALID_EDGES_MAX``.
_VALID_EDGES: set[tuple[float, ...]] = set()
_VALID_EDGES_MAX = 256


class Histogram(msgspec.Struct, kw_only=True):
    """Counts over ``len(edges) - 1`` bins. Counts are integers (DP noise is integer too)."""

    edges: list[float]
    counts: list[int]

    def __post_init__(self) -> None:
        # Runs on every decode (3 histograms per telemetry aggregate, the cloud's hot path):
        # edges are checked once per distinct edges tuple, the count length every time.
        key = tuple(self.edges)
        if key not in _VALID_EDGES:
            if len(self.edges) < 2:
                raise ValueError(f"a histogram needs at least 2 edges, got {self.edges!r}")
            if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
                raise ValueError(f"histogram edges must increase strictly, got {self.edges!r}")
            if len(_VALID_EDGES) >= _VALID_EDGES_MAX:
                _VALID_EDGES.clear()  # bounded: arbitrary edges from outside cannot grow it
            _VALID_EDGES.add(key)
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(
                f"histogram with {len(self.edges)} edges needs {len(self.edges) - 1} counts, "
                f"got {len(self.counts)}"
            )

    @classmethod
    def empty(cls, edges: Sequence[float]) -> Histogram:
        return cls(edges=list(edges), counts=[0] * (len(edges) - 1))

    @classmethod
    def of(cls, edges: Sequence[float], values: Iterable[float]) -> Histogram:
        h = cls.empty(edges)
        for v in values:
            h.counts[bin_index(h.edges, v)] += 1
        return h

    @property
    def total(self) -> int:
        return sum(self.counts)

    def add(self, value: float, n: int = 1) -> None:
        """Count ``value`` ``n`` times (in place)."""
        self.counts[bin_index(self.edges, value)] += n

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram holding both counts. Raises ``HistogramMismatch`` on other edges."""
        if self.edges != other.edges:
            raise HistogramMismatch(self.edges, other.edges)
        return Histogram(
            edges=list(self.edges),
            counts=[a + b for a, b in zip(self.counts, other.counts, strict=True)],
        )

    def quantile(self, q: float) -> float:
        """Approximate quantile by linear interpolation inside the bin (for p95 gates).

        The last bin is a catch-all when its upper edge is at least 10x its lower one (e.g.
        latency 10 s .. 1e6 ms): nothing is known about where inside it a value lies, so a
        quantile falling there is reported as the bin's lower edge, a lower bound (linear
        interpolation made a p95 of "809 s" out of requests that took a few hundred ms)."""
        total = self.total
        if total <= 0:
            return float("nan")
        target = q * total
        seen = 0
        last = len(self.counts) - 1
        for i, c in enumerate(self.counts):
            if c > 0 and seen + c >= target:
                lo, hi = self.edges[i], self.edges[i + 1]
                if i == last and lo > 0 and hi >= 10 * lo:
                    return lo
                frac = (target - seen) / c
                return lo + frac * (hi - lo)
            seen += max(c, 0)
        return self.edges[-1]
