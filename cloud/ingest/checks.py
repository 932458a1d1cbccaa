"""Range and consistency checks of one telemetry aggregate, before anything is applied.

A decoded aggregate can still be absurd (issue 13 fault 3): negative or astronomically large
counts, more errors than inferences, class counts that do not add up to ``count``, NaN or
infinite histogram edges, a ``seq`` no node will ever reach, a window in year 9999 or 1970 or
ending before it starts. ``check_ranges`` refuses those with ``Rejected`` naming the field
and the values; the caller dead-letters the message with that reason. ``check_manifest`` does
the same against the model's manifest (labels and histogram edges of the model).

Where the bounds come from:

* ``MAX_COUNT`` (2**40, about 1.1e12 inferences per window): far above any device (the edge
  bench serves some thousands per second), far below int64, so node and fleet sums stay exact
  for 2**23 windows at the bound and never overflow SQLite's or msgpack's 64-bit integers.
* ``MAX_SEQ`` (2**53 - 1): exact as a double, beyond any node's lifetime (one window per
  second for 285 million years).
* DP noise: with ``privacy.mechanism = "geometric"`` every class, histogram and feedback count
  carries two-sided geometric noise of ``alpha = exp(-epsilon / 5)`` (``edge/privacy.py``), so
  a noised count may be negative and sums may miss ``count``. A cell's noise exceeds
  ``t`` with probability below ``2·alpha**t``; the slack allowed per cell is ``t`` with that
  chance at 1e-13 (``noise_slack``), per merged window (noise adds up under compaction).
* Time: a window may not end in the future beyond ``max_clock_skew`` of the message's server
  timestamp (the JetStream time it was stored, never this host's or the node's clock), nor
  start more than ``max_window_age`` before it (an outbox backlog may be old; 1970 is not).
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from slmops.shared.histogram import Histogram
from slmops.shared.messages import ModelManifest, TelemetryAggregate
from slmops.shared.vocabulary import DP_SENSITIVITY

__all__ = ["MAX_COUNT", "MAX_SEQ", "Rejected", "check_manifest", "check_ranges", "noise_slack"]

MAX_COUNT = 2**40
MAX_SEQ = 2**53 - 1
MAX_WINDOWS = 10**9
#: -ln(1e-13 / 2): a geometric noise draw exceeds ``_TAIL / (-ln alpha)`` with chance 1e-13.
_TAIL = -math.log(0.5e-13)
_INSTALL = re.compile(r"[0-9a-f]{32}")


class Rejected(ValueError):
    """An aggregate that decodes but cannot be true; the message says which field and why."""


def noise_slack(agg: TelemetryAggregate) -> int:
    """How far one noised count of ``agg`` may stray from the truth (0 without noise)."""
    p = agg.privacy
    if p.mechanism != "geometric":
        return 0
    eps = p.epsilon
    if eps is None or not math.isfinite(eps) or eps <= 0:
        raise Rejected(f"$.privacy.epsilon must be a positive number with geometric noise, got {eps!r}")
    # The sensitivity the node noised with (it says so), else the contract's one constant.
    per_window = math.ceil(_TAIL * (p.sensitivity or DP_SENSITIVITY) / eps)
    return min(per_window * agg.windows, MAX_COUNT)


def _count(value: int, path: str, low: int = 0) -> None:
    if not low <= value <= MAX_COUNT:
        raise Rejected(f"{path} must be in {low}..{MAX_COUNT}, got {value!r}")


def _hist(h: Histogram, path: str, slack: int, total_max: int) -> None:
    # Checked in bulk first and named one by one only on failure: building each cell's path
    # eagerly was a quarter of the cloud's ingest time in a reconnect drain (issue 18 profile).
    if not all(map(math.isfinite, h.edges)):
        for i, e in enumerate(h.edges):
            if not math.isfinite(e):
                raise Rejected(f"{path}.edges[{i}] must be finite, got {e!r}")
    low = -slack
    if not all(low <= c <= MAX_COUNT for c in h.counts):
        for i, c in enumerate(h.counts):
            _count(c, f"{path}.counts[{i}]", low)
    total = sum(h.counts)
    if total > total_max + slack * len(h.counts):
        raise Rejected(f"{path} counts sum to {total}, more than $.count ({total_max})")


def check_ranges(
    agg: TelemetryAggregate,
    now: datetime,
    *,
    max_clock_skew: float,
    max_window_age: float,
) -> None:
    """Raise ``Rejected`` unless every number and time of ``agg`` is possible; ``now`` is the
    message's server timestamp (aware)."""
    if agg.install and not _INSTALL.fullmatch(agg.install):
        raise Rejected(
            f"$.install must be 32 lowercase hex digits (a uuid4) or empty, got {agg.install[:64]!r}"
        )
    if not 1 <= agg.seq <= MAX_SEQ:
        raise Rejected(f"$.seq must be in 1..{MAX_SEQ}, got {agg.seq!r}")
    if not 1 <= agg.windows <= MAX_WINDOWS:
        raise Rejected(f"$.windows must be in 1..{MAX_WINDOWS}, got {agg.windows!r}")
    _count(agg.count, "$.count")
    _count(agg.errors, "$.errors")
    _count(agg.dropped_inferences, "$.dropped_inferences")
    _count(agg.dropped_aggregates, "$.dropped_aggregates")
    if agg.errors > agg.count:
        raise Rejected(f"$.errors ({agg.errors}) is more than $.count ({agg.count})")
    slack = noise_slack(agg)
    # The edge counts answered inferences (count - errors) in classes and histograms; the
    # bound is ``count`` so that producers counting errors there too are not refused.
    answered = agg.count
    if not all(-slack <= c <= MAX_COUNT for c in agg.class_counts.values()):
        for label, c in agg.class_counts.items():
            _count(c, f"$.class_counts[{label!r}]", -slack)
    classes = sum(agg.class_counts.values())
    if classes > answered + slack * len(agg.class_counts):
        raise Rejected(f"$.class_counts sum to {classes}, more than $.count ({agg.count})")
    _hist(agg.confidence, "$.confidence", slack, answered)
    _hist(agg.input_length, "$.input_length", slack, answered)
    _hist(agg.latency_ms, "$.latency_ms", slack, answered)
    for truth, row in agg.feedback.items():
        if not all(-slack <= c <= MAX_COUNT for c in row.values()):
            for label, c in row.items():
                _count(c, f"$.feedback[{truth!r}][{label!r}]", -slack)
    start, end = agg.window_start, agg.window_end
    for path, t in (("$.window_start", start), ("$.window_end", end)):
        if t.tzinfo is None or t.utcoffset() is None:
            raise Rejected(f"{path} must carry a time zone, got {t.isoformat()!r}")
    if end < start:
        raise Rejected(f"$.window_end {end.isoformat()} is before $.window_start {start.isoformat()}")
    if end > now + timedelta(seconds=max_clock_skew):
        raise Rejected(
            f"$.window_end {end.isoformat()} is in the future: more than max_clock_skew "
            f"({max_clock_skew:g} s) after the server time {now.isoformat()}"
        )
    if start < now - timedelta(seconds=max_window_age):
        raise Rejected(
            f"$.window_start {start.isoformat()} is more than max_window_age "
            f"({max_window_age:g} s) before the server time {now.isoformat()}"
        )


def check_manifest(agg: TelemetryAggregate, manifest: ModelManifest) -> None:
    """Raise ``Rejected`` when ``agg`` names labels or histogram edges its model does not have."""
    labels = set(manifest.labels)
    unknown = [label for label in agg.class_counts if label not in labels]
    for truth, row in agg.feedback.items():
        unknown += [x for x in (truth, *row) if x not in labels]
    if unknown:
        shown = sorted(set(unknown))[:5]
        raise Rejected(
            f"labels {shown} are not labels of model {manifest.name} v{manifest.version} "
            f"({len(manifest.labels)} labels)"
        )
    edges = manifest.edges
    for path, h, want in (
        ("$.confidence", agg.confidence, edges.confidence),
        ("$.input_length", agg.input_length, edges.input_length),
        ("$.latency_ms", agg.latency_ms, edges.latency_ms),
    ):
        if list(h.edges) != list(want):
            raise Rejected(
                f"{path}.edges {list(h.edges)[:12]} are not the model's {list(want)[:12]} "
                f"({manifest.name} v{manifest.version})"
            )
