"""Per-window tests on counts, effect sizes, Benjamini–Hochberg (docs/architecture.md §7).

The per-window test is Pearson's χ² of observed counts against a reference distribution, with
each cell's variance widened for what else is random under the null:

* the reference itself was estimated from ``n_ref`` counts: ``Var(x - n p̂) ≈ n p (1 + n/n_ref)``
  (a two-sample test, so a huge window cannot "detect" the reference's own sampling error);
* differential-privacy noise the edge added to every count (``noise_var`` per cell, summed over
  the aggregates pooled into the window).

χ² is turned into a z-score with the Wilson–Hilferty cube-root transform, which is accurate to a
few hundredths of a unit in the range that matters and costs a few floating-point operations (no
scipy call per window: ingest must stay above 10k aggregates/s). Calibration (``calibrate``)
then corrects what the χ² approximation gets wrong for small windows, by simulation.
Everything here is pure Python on short lists (windows have 2–30 cells), except
``window_z_rows``: the same z for many windows at once, in numpy, for the ingest hot path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "benjamini_hochberg",
    "geometric_noise_var",
    "noise_tv",
    "normalise",
    "total_variation",
    "wilson_hilferty_z",
    "window_test",
    "window_z",
    "window_z_rows",
    "z_to_p",
]

#: Added to every reference count before normalising, so a cell never seen in the reference
#: does not make the statistic infinite (Jeffreys-like smoothing).
SMOOTHING = 0.5


def normalise(counts: Sequence[float], smoothing: float = SMOOTHING) -> list[float]:
    """Probabilities from counts with ``smoothing`` added to each cell."""
    if not counts:
        raise ValueError("cannot normalise an empty count vector")
    total = sum(max(c, 0.0) for c in counts) + smoothing * len(counts)
    if total <= 0:
        raise ValueError(f"counts {list(counts)!r} sum to zero and smoothing is 0")
    return [(max(c, 0.0) + smoothing) / total for c in counts]


def geometric_noise_var(epsilon: float | None, sensitivity: float = 1.0) -> float:
    """Variance of two-sided geometric noise with ``α = exp(-ε/Δ)``: ``2α / (1-α)²``."""
    if epsilon is None or epsilon <= 0:
        return 0.0
    alpha = math.exp(-epsilon / sensitivity)
    return 2 * alpha / (1 - alpha) ** 2


def wilson_hilferty_z(stat: float, df: int) -> float:
    """Standard-normal deviate of a χ²(df) statistic (Wilson & Hilferty 1931)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    c = 2.0 / (9.0 * df)
    root = math.pow(max(stat, 0.0) / df, 1.0 / 3.0)
    return (root - (1.0 - c)) / math.sqrt(c)


def z_to_p(z: float) -> float:
    """One-sided upper-tail p-value of a standard-normal z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def total_variation(counts: Sequence[float], probs: Sequence[float]) -> float:
    """Total-variation distance between observed proportions and ``probs`` (0..1)."""
    total = sum(max(c, 0.0) for c in counts)
    if total <= 0:
        return 0.0
    return 0.5 * sum(abs(max(c, 0.0) / total - p) for c, p in zip(counts, probs, strict=True))


def noise_tv(probs: Sequence[float], n: float, n_ref: float) -> float:
    """Expected total-variation distance from sampling noise alone, for ``n`` counts against
    a reference estimated from ``n_ref``: ``½ Σ E|p̂ - p|`` with the normal approximation
    ``E|X| = σ·√(2/π)``, ``σ² = p(1-p)·(1/n + 1/n_ref)``."""
    if n <= 0:
        return 1.0
    inv = 1.0 / n + (1.0 / n_ref if n_ref > 0 else 0.0)
    return 0.5 * math.sqrt(2.0 / math.pi * inv) * sum(math.sqrt(p * (1.0 - p)) for p in probs)


def window_test(
    counts: Sequence[float],
    probs: Sequence[float],
    n_ref: float,
    noise_var: float = 0.0,
    *,
    upper_cell: int | None = None,
    want_effect: bool = True,
) -> tuple[float, float]:
    """``(z, effect)`` of one window's ``counts`` against reference ``probs``
    (``effect`` is 0.0 when not ``want_effect``, which saves a third of the work).

    ``z`` is ~N(0, 1) under the null, large when the window differs. ``upper_cell`` makes the
    test one-sided for two-cell signals: only a rise of that cell's share counts as evidence (a
    fall gives ``-|z|``). ``effect`` is the total-variation distance. Negative counts (DP noise)
    count as zero. One pass over the cells: this runs for every signal of every window.
    """
    if not want_effect:
        return window_z(counts, probs, n_ref, noise_var, upper_cell), 0.0
    if len(counts) != len(probs):
        raise ValueError(f"{len(counts)} counts against {len(probs)} reference cells")
    n = 0.0
    for c in counts:
        if c > 0:
            n += c
    if n <= 0:
        return 0.0, 0.0
    inflate = n * (1.0 + (n / n_ref if n_ref > 0 else 0.0))
    stat = 0.0
    tv = 0.0
    inv_n = 1.0 / n
    for c, p in zip(counts, probs, strict=True):
        d = c - n * p
        stat += d * d / (p * inflate + noise_var)
        share = c * inv_n if c > 0 else 0.0
        tv += share - p if share > p else p - share
    z = wilson_hilferty_z(stat, len(counts) - 1)
    if upper_cell is not None and counts[upper_cell] < n * probs[upper_cell]:
        z = -abs(z)
    return z, 0.5 * tv


def window_z(
    counts: Sequence[float],
    probs: Sequence[float],
    n_ref: float,
    noise_var: float = 0.0,
    upper_cell: int | None = None,
) -> float:
    """``z`` of ``window_test`` (which calls this when ``want_effect`` is False), for the ingest
    hot path: no effect, no tuple, the Wilson–Hilferty constants of each ``df`` computed once."""
    if len(counts) != len(probs):
        raise ValueError(f"{len(counts)} counts against {len(probs)} reference cells")
    n = 0.0
    for c in counts:
        if c > 0:
            n += c
    if n <= 0:
        return 0.0
    inflate = n * (1.0 + (n / n_ref if n_ref > 0 else 0.0))
    stat = 0.0
    for c, p in zip(counts, probs, strict=True):
        d = c - n * p
        stat += d * d / (p * inflate + noise_var)
    df = len(counts) - 1
    wh = _WH.get(df) or _wh(df)
    z = (math.pow(max(stat, 0.0) / df, 1.0 / 3.0) - wh[0]) / wh[1]
    if upper_cell is not None and counts[upper_cell] < n * probs[upper_cell]:
        z = -abs(z)
    return z


#: df -> (1 - c, √c) of the Wilson–Hilferty transform, c = 2 / (9 df).
_WH: dict[int, tuple[float, float]] = {}


def _wh(df: int) -> tuple[float, float]:
    """Compute and cache ``_WH[df]`` (callers look in ``_WH`` first: the hot path)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    c = 2.0 / (9.0 * df)
    wh = _WH[df] = (1.0 - c, math.sqrt(c))
    return wh


def window_z_rows(
    counts: Sequence[Sequence[float]],
    probs: Sequence[Sequence[float]],
    n_ref: Sequence[float],
    noise_var: Sequence[float],
    upper_cell: int | None = None,
) -> list[float]:
    """``window_z`` of many windows (row i: ``counts[i]`` against ``probs[i]``), equal to it
    bit for bit: element-wise the scalar version's operations in its order (IEEE doubles round
    the same in numpy and Python), sums taken column by column, and the cube root is the same
    ``math.pow``. About three times cheaper per window than ``window_z`` at 200 rows of 10
    cells; dearer below a few dozen rows. Rows may have different cell counts (they are grouped)."""
    m = len(counts)
    if not len(probs) == len(n_ref) == len(noise_var) == m:
        raise ValueError(f"row counts differ: {m}, {len(probs)}, {len(n_ref)}, {len(noise_var)}")
    out = [0.0] * m
    groups: dict[int, list[int]] = {}
    for i in range(m):
        cells = len(counts[i])
        if cells != len(probs[i]):
            raise ValueError(f"{cells} counts against {len(probs[i])} reference cells")
        groups.setdefault(cells, []).append(i)
    for cells, rows in groups.items():
        df = cells - 1
        wh = _WH.get(df) or _wh(df)
        k = len(rows)
        cnt = _matrix([counts[i] for i in rows], k, cells)
        prb = _matrix([probs[i] for i in rows], k, cells)
        nref = np.array([n_ref[i] for i in rows], dtype=np.float64)
        noise = np.array([noise_var[i] for i in rows], dtype=np.float64)
        pos = np.where(cnt > 0, cnt, 0.0)
        n = _column_sum(pos)
        ratio = np.zeros(k)
        np.divide(n, nref, out=ratio, where=nref > 0)
        inflate = n * (1.0 + ratio)
        with np.errstate(divide="ignore", invalid="ignore"):  # rows with n <= 0 are skipped
            d = cnt - n[:, None] * prb
            stat = _column_sum(d * d / (prb * inflate[:, None] + noise[:, None]))
        ups = (cnt[:, upper_cell] < n * prb[:, upper_cell]).tolist() if upper_cell is not None else None
        a, b = wh
        third = 1.0 / 3.0
        for r, (i, nr, st) in enumerate(zip(rows, n.tolist(), stat.tolist(), strict=True)):
            if nr <= 0:
                continue
            z = (math.pow(max(st, 0.0) / df, third) - a) / b
            if ups is not None and ups[r]:
                z = -abs(z)
            out[i] = z
    return out


def _column_sum(a: np.ndarray) -> np.ndarray:
    """Row sums added column by column, left to right: the scalar loop's order, so the same
    doubles (``a.sum(axis=1)`` may pair the terms differently)."""
    total = a[:, 0] + 0.0
    for j in range(1, a.shape[1]):
        total = total + a[:, j]
    return total


def _matrix(rows: Sequence[Sequence[float]], k: int, cells: int) -> np.ndarray:
    """``k`` rows of ``cells`` numbers as a float64 matrix (``fromiter`` over the chained rows
    is several times faster than ``np.array`` of nested lists)."""
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.float64, count=k * cells)
    return flat.reshape(k, cells)


def benjamini_hochberg(p_values: Sequence[float], q: float) -> list[bool]:
    """Which hypotheses Benjamini–Hochberg rejects at false-discovery rate ``q``."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    m = len(p_values)
    ordered = sorted(p_values)
    k = 0
    for rank, p in enumerate(ordered, start=1):
        if p <= q * rank / m:
            k = rank
    if k == 0:
        return [False] * m
    # The step-up set is every p at or below the k-th smallest: a p tied with it has rank <= k
    # (a tie at rank k + 1 would pass the test too, so k would not be the largest).
    cut = ordered[k - 1]
    return [p <= cut for p in p_values]
