"""What a rollout has measured: the canary (the new version) and the control (the previous
version) over the SAME period, and the canary's nodes just before they switched.

A rollout compares two versions that serve side by side. On a shared machine (or a fleet whose
load changes over the day) a latency or confidence figure measured at another time says more
about that time than about the version: a canary's p95 under load against the control's from
a quiet hour fails a good version. So the gates read :meth:`Tracker.paired`: each side limited
to the period in which BOTH versions were serving — from the later of the two sides' first
window starts to the earlier of their last window ends; a window counts when its midpoint is
inside. That interval only grows as windows
arrive (a minimum over more windows only falls, a maximum only rises), so the merged figures
are built incrementally: each aggregate is merged once.

The latency gate also reads :meth:`Tracker.before`: the previous version on the canary's own
nodes in the ``BEFORE_S`` seconds before their assignment — the same processes on the same
devices — so that one node that is slow whatever it runs is not blamed on the version.
"""

from __future__ import annotations

import collections
from datetime import datetime

from slmops.cloud.rollout.gates import Metrics
from slmops.cloud.rollout.state import RolloutState
from slmops.shared.messages import TelemetryAggregate

__all__ = ["BEFORE_S", "Period", "Tracker"]

#: Aggregates kept per side as candidates for the paired period (bounded memory: at 60 s
#: windows, 20,000 is 1,000 nodes for 20 minutes, about 20 MB); what was merged stays merged.
_KEEP = 20_000
#: Windows of the previous version kept per node for the before/after comparison.
_KEEP_BEFORE = 64
#: How far before its assignment a node's previous-version windows count as "before".
BEFORE_S = 300.0


class Period:
    """The interval in which both versions served (UTC datetimes), or None while one side has
    not reported."""

    __slots__ = ("end", "start")

    def __init__(self, start: datetime, end: datetime) -> None:
        self.start = start
        self.end = end

    def __str__(self) -> str:
        return f"{self.start:%H:%M:%S}-{self.end:%H:%M:%S} UTC"


class Tracker:
    """In-memory measurements of one rollout, fed every aggregate of its fleet."""

    def __init__(self, state: RolloutState) -> None:
        self.id = state.id
        self.stage = state.stage
        #: Every canary aggregate since the rollout started (each (node, seq) once).
        self.canary = Metrics()
        #: Every previous-version aggregate since the rollout started.
        self.control = Metrics()
        self._can: collections.deque[TelemetryAggregate] = collections.deque(maxlen=_KEEP)
        self._ctl: collections.deque[TelemetryAggregate] = collections.deque(maxlen=_KEEP)
        self._before: dict[str, collections.deque[TelemetryAggregate]] = {}
        self._bounds: dict[str, tuple[datetime, datetime]] = {}
        self._canary_nodes: set[str] = set()
        self._warmup: set[tuple[str, str, int]] = set()
        #: The canary's nodes before their switch (``before``), merged as nodes join:
        #: node -> its assignment time, for the nodes already merged.
        self._before_m = Metrics()
        self._folded: dict[str, float] = {}
        self._paired_can = Metrics()
        self._paired_ctl = Metrics()
        self._period: Period | None = None
        self._dirty = False

    def add(self, state: RolloutState, agg: TelemetryAggregate) -> None:
        if agg.model.name != state.model:
            return
        if agg.model.version == state.version:
            # A node's first window on the new version holds its swap: a new ORT session is
            # slow on its first runs (and the install ran beside it). Its latency is left out.
            warm = agg.node in self._canary_nodes
            if not warm:
                self._canary_nodes.add(agg.node)
                self._warmup.add((agg.node, agg.install, agg.seq))
            if self.canary.add(agg, latency=warm):
                self._can.append(agg)
                self._extend("canary", agg)
            return
        if state.previous_version is not None and agg.model.version != state.previous_version:
            return
        before = self._before.get(agg.node)
        if before is None:
            before = self._before[agg.node] = collections.deque(maxlen=_KEEP_BEFORE)
        before.append(agg)
        end = agg.window_end.timestamp()
        while before and before[0].window_end.timestamp() < end - 2 * BEFORE_S:
            before.popleft()  # older than any assignment still to come can look back
        at = self._folded.get(agg.node)
        if at is not None and at - BEFORE_S <= end <= at + 1.0:  # late, for a node merged
            self._before_m.add(agg)
        if agg.window_end.timestamp() >= state.created and self.control.add(agg):
            self._ctl.append(agg)
            self._extend("control", agg)

    def _extend(self, side: str, agg: TelemetryAggregate) -> None:
        lo, hi = self._bounds.get(side, (agg.window_start, agg.window_end))
        self._bounds[side] = (min(lo, agg.window_start), max(hi, agg.window_end))
        self._dirty = True

    def paired(self) -> tuple[Metrics, Metrics, Period | None]:
        """Canary and control merged over the period both served, and that period."""
        if self._dirty and len(self._bounds) == 2:
            self._dirty = False
            (c_lo, c_hi), (k_lo, k_hi) = self._bounds["canary"], self._bounds["control"]
            start, end = max(c_lo, k_lo), min(c_hi, k_hi)
            if start <= end:
                self._period = Period(start, end)
                for side, metrics in ((self._can, self._paired_can), (self._ctl, self._paired_ctl)):
                    for agg in side:  # Metrics.add skips what it already counted
                        if start <= agg.window_start + (agg.window_end - agg.window_start) / 2 <= end:
                            metrics.add(agg, latency=(agg.node, agg.install, agg.seq) not in self._warmup)
        return self._paired_can, self._paired_ctl, self._period

    def sides(self, min_samples: int, *, control_group: bool) -> tuple[Metrics, list[Metrics], str]:
        """What the gates judge: ``(canary, controls, source)``.

        Both sides have ``min_samples`` in the paired period (the last stage has no node
        outside; earlier stages measured both): the paired figures. Else, with a control
        group (nodes outside the rollout sending telemetry) the gates wait for the period to
        fill — showing the whole canary's progress while the control is short. Else there is
        no control group: the whole canary, judged against its own reference."""
        can, ctl, period = self.paired()
        source = f"control, same period {period}" if period is not None else "control"
        if can.count >= min_samples and ctl.count >= min_samples:
            return can, [ctl], source
        if control_group:
            return (can if ctl.count >= min_samples else self.canary), [ctl], source
        return self.canary, [], "no control group"

    def before(self, state: RolloutState) -> Metrics:
        """The previous version on the canary's nodes in the ``BEFORE_S`` before each node's
        assignment (the same devices, just before the switch)."""
        if len(self._folded) < len(state.nodes):  # nodes joined: merge theirs once
            for node, entry in state.nodes.items():
                if node in self._folded:
                    continue
                self._folded[node] = entry.assigned_at
                for agg in self._before.get(node, ()):
                    end = agg.window_end.timestamp()
                    if entry.assigned_at - BEFORE_S <= end <= entry.assigned_at + 1.0:
                        self._before_m.add(agg)
        return self._before_m
