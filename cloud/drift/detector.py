"""The drift detector: per-window tests, CUSUM evidence, BH across the fleet, hysteresis.

How a decision is made (docs/architecture.md §7):

1. **Groups.** Aggregates are grouped by fleet and model (name, version, variant); each group
   has one reference per signal (``signals.py``).
2. **Node windows.** Each node's counts of a signal accumulate until they hold ``min_count``
   inferences — a smaller window is never tested alone, it is carried into the next one — and
   are then tested against the reference (``stats.window_test``: a χ² z-score with the
   reference's and the DP noise's variance in the null). The z-score feeds a one-sided CUSUM,
   ``S = max(0, S + z - k)``.
3. **Rounds (fleet pooling first), keyed by window time.** A round is one window from every
   node that reports: it closes when a node sends its next *current* aggregate. At round close,
   all the round's counts pooled fleet-wide are tested the same way (a fleet-wide shift shows
   there with far more power), and every unit × signal updated in the round gets a p-value: the
   calibrated chance that a null CUSUM stands at its ``S`` (``calibrate.py``). A closed round
   sets the group's *frontier*: the median ``window_end`` of its windows (a median, so a node
   whose clock runs ahead — up to the ingest's ``max_clock_skew`` — cannot move it alone), but
   never later than the detector's clock less one window (a fast node draining its backlog
   closes rounds holding itself alone, whose median is its own clock); the frontier never goes
   back. A node whose clock runs *behind* the fleet by more than a window sends only late
   windows: it is tested as a node, never pooled into the fleet (known limit).
   An aggregate whose ``window_end`` is at or before the frontier is
   **late**: its window time's round was already evaluated (a reconnecting node draining its
   outbox, a straggler, a compacted backlog). A late window joins its node's evidence only
   (node CUSUM, node baseline, carried-over counts, in the node's own order), never a fleet
   pool, and never closes a round; its node joins the next round's BH family once, however
   many late windows it sent (its CUSUM then holds all of them: one look, not one per
   window). So a drain of a day of old windows costs node tests only, the rounds evaluated are
   at most one per window time, and the fleet pool is never a handful of draining nodes (the
   flapping fleet events of issue 18). Late windows are counted as usual (the ingest's node
   state) but are not in the round history (``take_rounds``). When many nodes drain at once
   while the rest are silent (a fleet-wide outage, a reconnect storm), the rounds follow the
   first node to send its next window and the others' windows of that time arrive late; such
   rounds hold a few nodes, so a round is tested *as the fleet* only when it holds at least
   half the most nodes of a round closed in the last hour or two (``_quorate``, the
   detector's clock): a smaller one is closed for its nodes' tests but neither steps the
   fleet CUSUM nor joins the automatic baseline, so its composition cannot open or close
   fleet events. (A fleet that loses over half its reporting nodes within an hour — for good,
   or a quiet night — has no fleet test until that memory has passed: one to two hours.)
4. **Benjamini–Hochberg** over that family (fleet × signals and nodes × signals) at level
   ``q = min(0.1, target_false_rate × node windows in the round, target_false_per_fleet_day ×
   window length / 1 day)`` (``round_level``): under stationary traffic the chance of any false
   event in a round is at most ``q``, so false events per node-window stay below the first
   target and false events per fleet-day below the second (a 10,000-node fleet's round has
   10,000 node windows: the first term alone let ``q`` reach 0.1 per round, up to 144 a day).
5. **Hysteresis.** A rejected unit opens an event only if its effect (total-variation distance
   of the counts since its CUSUM left zero) reaches ``min_effect``, and a node-level event is not
   opened for a signal the whole fleet already has open. An open event is ``updated`` when its
   severity rises and ``resolved`` after ``resolve_windows`` consecutive quiet windows, which
   also resets its CUSUM.

Not thread-safe; one detector per service. Its state is the plain msgspec Structs of
``units.py``, so the caller persists exactly the groups and node units a batch touched
(``take_dirty``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from slmops.cloud.config import DriftConfig
from slmops.cloud.drift.calibrate import Calibrator, shared_calibrator
from slmops.cloud.drift.report import baseline_event, build_event, mean_confidence, skew_event
from slmops.cloud.drift.signals import INPUT_SIDE, ONE_SIDED, Acc, SignalRef, extract
from slmops.cloud.drift.stats import (
    benjamini_hochberg,
    noise_tv,
    normalise,
    total_variation,
    window_z,
    window_z_rows,
)
from slmops.cloud.drift.units import Group, NodeUnit, RoundRecord, UnitSig, group_key, new_group
from slmops.shared.messages import DriftEvent, ModelManifest, ModelRef, TelemetryAggregate

__all__ = ["DriftDetector", "round_level"]

log = structlog.get_logger(__name__)


def round_level(cfg: DriftConfig, node_windows: int, window_s: float) -> float:
    """The Benjamini–Hochberg level of one round: at most 0.1, ``target_false_rate`` per
    node window tested in the round, and ``target_false_per_fleet_day`` spread over the day's
    rounds (``86400 / window_s`` of them; ``window_s`` in seconds). E.g. 10,000 nodes, 1-minute
    windows, defaults: ``min(0.1, 0.5, 0.5 / 1440) = 3.5e-4``."""
    per_day = cfg.target_false_per_fleet_day * window_s / 86_400.0
    return min(0.1, cfg.target_false_rate * max(1, node_windows), per_day)


@dataclass(frozen=True, slots=True)
class DetectorStatistics:
    """A snapshot of ``DriftDetector.statistics()``."""

    groups: int
    node_units: int
    calibrations: int
    calibrations_queued: int


class DriftDetector:
    """Feeds aggregates through the detection pipeline; returns the drift events they cause."""

    def __init__(
        self,
        config: DriftConfig,
        clock: Callable[[], datetime],
        calibrator: Calibrator | None = None,
    ) -> None:
        self._cfg = config
        self._clock = clock
        self._cal = calibrator or shared_calibrator(config.cusum_allowance, config.calibration_windows)
        #: Public so the service can run its worker (``Calibrator.run_worker``).
        self.calibrator = self._cal
        self.groups: dict[str, Group] = {}
        self.units: dict[tuple[str, str], NodeUnit] = {}
        self._dirty_groups: set[str] = set()
        self._dirty_units: set[tuple[str, str]] = set()
        #: Group key -> set of ``Group.round_nodes`` (rebuilt from the list when missing): the
        #: round-close check runs per aggregate, a list scan would be O(nodes).
        self._round_sets: dict[str, set[str]] = {}
        #: Group key -> set of ``Group.late_nodes`` (the same index for late windows).
        self._late_sets: dict[str, set[str]] = {}
        #: Group key -> signal -> this round's windows not yet added into ``Group.round``
        #: (counts, noise, start, end), added per batch (``take_dirty``) and at round close:
        #: one column sum per signal instead of a list sum per aggregate. Integer counts, so the
        #: sums are exact in any grouping; noise is added in arrival order as before.
        self._round_pending: dict[str, dict[str, list[tuple[list[float], float, datetime, datetime]]]] = {}
        #: Signal -> node windows due for their test, run together (``_run_tests``) before
        #: anything reads a node's CUSUM: at a round close and in ``take_dirty``. A node is in
        #: a round once, so no unit appears twice here.
        self._tests: dict[str, list[tuple[UnitSig, SignalRef, Acc, str]]] = {}
        #: Signals quarantined since the caller last took them (``take_quarantines``).
        self._quarantined: list[tuple[Group, str, str]] = []
        self._history: list[RoundRecord] = []
        #: Group key -> node -> its unit (the same objects as ``units``): fleet-wide steps
        #: (episode open/close, quarantine) touch one group's units, not every group's.
        self._by_group: dict[str, dict[str, NodeUnit]] = {}
        #: Group key -> nodes that opened an event and may still have it open (checked, and
        #: dropped once closed, by ``_healthy``): a round's health check was a scan of every
        #: unit, O(nodes) per round — in a reconnect drain, where a round closes at nearly
        #: every aggregate, that made the drain O(nodes × aggregates) (issue 18).
        self._maybe_open: dict[str, set[str]] = {}

    def take_rounds(self) -> list[RoundRecord]:
        """The fleet rounds closed since the last call (pooled counts per signal), for the
        round history (``StateStore``: the console's plots and analyst baselines)."""
        out, self._history = self._history, []
        return out

    def set_baseline(self, fleet: str, model: ModelRef, rounds: list[RoundRecord]) -> list[DriftEvent]:
        """An analyst's baseline: the pooled counts of ``rounds`` (from the round history)
        become the group's references for every signal they hold, open fleet events on those
        signals resolve (their traffic is the new normal) and their CUSUMs restart. Returns
        the events (a ``kind="baseline"`` event, then any resolutions). Raises ``KeyError``
        when the detector has no such group, ``ValueError`` when ``rounds`` hold no counts."""
        g = self.groups[group_key(fleet, model)]
        pooled: dict[str, Acc] = {}
        for r in rounds:
            for signal, acc in r.signals.items():
                have = pooled.get(signal)
                if have is None or len(have.counts) != len(acc.counts):
                    pooled[signal] = acc.copy()
                else:
                    have.merge(acc)
        pooled = {k: a for k, a in pooled.items() if a.n >= self._cfg.min_count}
        if not pooled:
            raise ValueError(f"{g.key}: no round in that period holds {self._cfg.min_count}+ inferences")
        self._dirty_groups.add(g.key)
        g.warm = {}
        return self._accept_baseline(g, pooled, "analyst")

    def _healthy(self, g: Group) -> bool:
        """A round is healthy (may join the automatic baseline) when no node of the group has
        an open event (a node incident must not become part of "normal"). O(nodes with an
        event opened since last checked), not O(nodes)."""
        maybe = self._maybe_open.get(g.key)
        if not maybe:
            return True
        units = self._by_group.get(g.key, {})
        for node in list(maybe):
            unit = units.get(node)
            if unit is not None and any(us.open for us in unit.sig.values()):
                return False
            maybe.discard(node)
        return True

    def _group_units(self, g: Group) -> dict[str, NodeUnit]:
        return self._by_group.get(g.key, {})

    def _accept_baseline(self, g: Group, pooled: dict[str, Acc], source: str) -> list[DriftEvent]:
        """``pooled`` becomes the group's production baseline (automatic: for signals with no
        reference yet, e.g. inherited input-side ones keep theirs). The first automatic one
        is also compared with the manifest's reference once: a difference is a ``skew``
        event, never drift."""
        now = self._clock()
        g.baselines += 1
        bid = f"{source}-{g.baselines}"
        name = f"baseline:{bid}"
        events: list[DriftEvent] = []
        start = min((a.start for a in pooled.values() if a.start is not None), default=None)
        end = max((a.end for a in pooled.values() if a.end is not None), default=None)
        for signal, acc in pooled.items():
            if acc.n <= 0 or (source == "auto" and signal in g.refs):
                continue
            g.refs[signal] = SignalRef(
                probs=normalise(acc.counts), n_ref=acc.n, source=name, start=acc.start, end=acc.end
            )
            us = g.fleet_sig.get(signal)
            if us is not None:
                if us.open:
                    effect = self._effect(us.last, g.refs[signal]) if us.last else 0.0
                    ev = self._event(g, None, signal, us, g.refs[signal], "resolved", effect)
                    ev.summary = f"{signal}: accepted as normal in {name}"
                    events.append(ev)
                # Start over, but never reuse an episode number (event ids are message ids).
                g.fleet_sig[signal] = UnitSig(episode=us.episode)
                self._reset_nodes(g, signal)
        g.baseline_id = bid
        if "confidence" in g.refs and g.ref_mean_conf is None:
            g.ref_mean_conf = mean_confidence(g, g.refs["confidence"].probs)
        log.info("drift_baseline", group=g.key, baseline=name, signals=sorted(pooled), start=start, end=end)
        events.insert(0, baseline_event(g, name, pooled, start, end, now))
        if source == "auto" and not g.skew_checked:
            g.skew_checked = True
            differences: dict[str, float] = {}
            for signal, mref in g.manifest_refs.items():
                have = pooled.get(signal)
                if have is None or len(have.counts) != len(mref.probs):
                    continue
                try:
                    z = window_z(have.counts, mref.probs, mref.n_ref, have.noise, ONE_SIDED.get(signal))
                    effect = self._effect(have.counts, mref)
                except Exception as exc:  # state-level poison (e.g. one cell): see _quarantine
                    self._quarantine(g, signal, exc)
                    continue
                if z >= _SKEW_Z and effect >= self._cfg.min_effect:
                    differences[signal] = round(effect, 4)
            if differences:
                skew = skew_event(g, differences, pooled, self._severity(max(differences.values())), now)
                log.info("drift_skew", group=g.key, differences=differences)
                events.append(skew)
        return events

    def statistics(self) -> DetectorStatistics:
        cal = self._cal.statistics()
        return DetectorStatistics(
            groups=len(self.groups),
            node_units=len(self.units),
            calibrations=cal.calibrations,
            calibrations_queued=cal.calibrations_queued,
        )

    def load(self, groups: list[Group], units: dict[tuple[str, str], NodeUnit]) -> None:
        self.groups = {g.key: g for g in groups}
        self.units = dict(units)
        self._by_group, self._maybe_open = {}, {}
        for (gk, node), unit in self.units.items():
            self._by_group.setdefault(gk, {})[node] = unit
            if any(us.open for us in unit.sig.values()):
                self._maybe_open.setdefault(gk, set()).add(node)
        self._round_sets = {}
        self._late_sets = {}
        self._round_pending = {}
        self._tests = {}

    def has_group(self, fleet: str, model: ModelRef) -> bool:
        return group_key(fleet, model) in self.groups

    def add_group(self, fleet: str, model: ModelRef, manifest: ModelManifest | None) -> None:
        """Start watching a (fleet, model); ``manifest`` supplies the reference when given."""
        g = new_group(fleet, model, manifest)
        # A new version (or variant) inherits the input-side baseline of the newest group of
        # the same fleet and model name: those signals do not depend on the model.
        older = [
            o for o in self.groups.values()
            if o.fleet == fleet and o.model.name == model.name and o.baseline_id
        ]  # fmt: skip
        if older:
            prev = max(older, key=lambda o: (o.model.version, o.rounds))
            for signal in INPUT_SIDE:
                ref = prev.refs.get(signal)
                if ref is not None and ref.source.startswith("baseline:"):
                    g.refs[signal] = ref
        self.groups[g.key] = g
        self._dirty_groups.add(g.key)
        log.info(
            "drift_group_added",
            group=g.key,
            manifest=manifest is not None,
            references={s: r.source for s, r in g.refs.items()},
        )

    def take_dirty(self) -> tuple[list[Group], list[tuple[str, str, NodeUnit]]]:
        """The groups and node units changed since the last call, up to date (node tests
        still due are run first)."""
        self._run_tests()
        for k in self._dirty_groups:
            self._flush_round(self.groups[k])
        # A quarantine above may have marked more units dirty; all are returned.
        groups = [self.groups[k] for k in self._dirty_groups]
        units = [(k[0], k[1], self.units[k]) for k in self._dirty_units]
        self._dirty_groups.clear()
        self._dirty_units.clear()
        return groups, units

    # -- the pipeline --------------------------------------------------------------------------

    def observe(self, agg: TelemetryAggregate) -> list[DriftEvent]:
        """Account one (deduplicated) aggregate. ``add_group`` must have been called for it."""
        g = self.groups[group_key(agg.fleet, agg.model)]
        if not g.labels and agg.class_counts:
            g.labels = sorted(agg.class_counts)
        if len(g.edges) < 3:
            for name, hist in (
                ("confidence", agg.confidence),
                ("input_length", agg.input_length),
                ("latency", agg.latency_ms),
            ):
                g.edges.setdefault(name, list(hist.edges))
        # First, before any state changes: what this aggregate brings (an error here is the
        # message's fault, and the caller dead-letters it).
        signals = extract(agg, g.labels, g.edges, "oos_unknown_token" in g.manifest_refs)
        self._dirty_groups.add(g.key)
        events: list[DriftEvent] = []
        in_round = self._round_sets.get(g.key)
        if in_round is None:
            in_round = self._round_sets[g.key] = set(g.round_nodes)
        end_ts = agg.window_end.timestamp()
        late = g.frontier is not None and end_ts <= g.frontier
        if not late and agg.node in in_round:
            # The round's window length (data time): rounds per day for the BH level. At least
            # 1 s: a window closed early (a tick, a version change) is not the fleet's cadence.
            g.window_s = max(1.0, (agg.window_end - agg.window_start).total_seconds())
            events = self._close_round(g)
        if g.quarantine:
            self._lift_quarantine(g)
            signals = {k: v for k, v in signals.items() if k not in g.quarantine}
        ukey = (g.key, agg.node)
        unit = self.units.get(ukey)
        if unit is None:
            unit = self.units[ukey] = NodeUnit()
            self._by_group.setdefault(g.key, {})[agg.node] = unit
        self._dirty_units.add(ukey)
        if late:
            self._late(g, agg.node)
        else:
            g.round_nodes.append(agg.node)
            g.round_ends.append(end_ts)
            in_round.add(agg.node)
        tested = False
        min_count = self._cfg.min_count
        start, end = agg.window_start, agg.window_end
        pending = self._round_pending.get(g.key)
        if pending is None:
            pending = self._round_pending[g.key] = {}
        tests = self._tests
        gkey = g.key
        for signal, (counts, noise) in signals.items():
            total = sum(counts)
            if not late:
                waiting = pending.get(signal)
                if waiting is None:
                    pending[signal] = [(counts, noise, start, end)]
                else:
                    waiting.append((counts, noise, start, end))
            acc = unit.acc.pop(signal, None)
            if acc is None:
                # Hot path: most windows are big enough to be tested on their own.
                acc = Acc(counts=counts, total=total, noise=noise, windows=1, start=start, end=end)
            else:
                acc.add(counts, noise, start, end)
            if acc.total < min_count:
                unit.acc[signal] = acc  # carried into the node's next window
                continue
            ref = unit.refs.get(signal)
            if ref is None:
                fleet_us = g.fleet_sig.get(signal)
                if fleet_us is None or not fleet_us.open:  # a drifting fleet is no baseline
                    self._warm_node(unit, signal, acc)
                continue
            us = unit.sig.get(signal)
            if us is None:
                us = unit.sig[signal] = UnitSig()
            due = tests.get(signal)
            if due is None:
                tests[signal] = [(us, ref, acc, gkey)]
            else:
                due.append((us, ref, acc, gkey))
            tested = True
        if tested and not late:
            g.round_node_windows += 1
        return events

    def _late(self, g: Group, node: str) -> None:
        """Note ``node`` as having sent a late window since the last round close: its units
        join that round's BH family once (``Group.late_nodes``; the set is the in-memory
        index, rebuilt from the list after a restart)."""
        late = self._late_sets.get(g.key)
        if late is None:
            late = self._late_sets[g.key] = set(g.late_nodes)
        if node not in late:
            late.add(node)
            g.late_nodes.append(node)

    def _warm_node(self, unit: NodeUnit, signal: str, acc: Acc) -> None:
        """Pool one tested window into the node's baseline being learnt; after
        ``node_baseline_windows`` *tested windows* it becomes the node's reference. (The
        warm accumulator's ``windows`` counts tested windows, not aggregates: a sparse signal
        such as feedback accuracy carries ~20 aggregates into one tested window, and counting
        those made a baseline of one window — as noisy as the windows tested against it,
        while the calibration assumes 20: 2,424 false events per fleet-day at 10,000 nodes,
        83% of them node accuracy, in ``slmops bench drift``'s fleet-day scenario.)"""
        warm = unit.warm.get(signal)
        if warm is None or len(warm.counts) != len(acc.counts):
            warm = unit.warm[signal] = Acc.empty(len(acc.counts))
        tested = warm.windows + 1
        warm.merge(acc)
        warm.windows = tested
        if warm.windows >= self._cfg.node_baseline_windows:
            unit.refs[signal] = SignalRef(probs=normalise(warm.counts), n_ref=warm.n, source="node_baseline")
            del unit.warm[signal]

    def _step(self, us: UnitSig, signal: str, ref: SignalRef, acc: Acc, *, fleet: bool = False) -> None:
        """One tested window into the unit's CUSUM. A window is *quiet* (towards resolving)
        when its z is below ``quiet_z``; for the fleet also when its effect net of noise is
        below half the minimum (a pooled window is so large that z alone never calms down
        against a reference that differs a little)."""
        z = window_z(acc.counts, ref.probs, ref.n_ref, acc.noise, ONE_SIDED.get(signal))
        effect = self._effect(acc.counts, ref) if fleet else 0.0
        quiet = z < self._cfg.quiet_z or (fleet and effect < self._cfg.min_effect / 2)
        self._advance(us, signal, z, acc, quiet, effect)

    def _run_tests(self) -> None:
        """The node windows due (``_tests``): their z-scores together per signal
        (``window_z_rows``, the same doubles as ``window_z``), then each into its CUSUM."""
        tests, self._tests = self._tests, {}
        quiet_z = self._cfg.quiet_z
        for signal, due in tests.items():
            upper = ONE_SIDED.get(signal)
            zs: list[float | None]
            try:
                if len(due) >= _ROWS_MIN:
                    zs = window_z_rows(  # type: ignore[assignment]
                        [acc.counts for _, _, acc, _ in due],
                        [ref.probs for _, ref, _, _ in due],
                        [ref.n_ref for _, ref, _, _ in due],
                        [acc.noise for _, _, acc, _ in due],
                        upper,
                    )
                else:
                    zs = [
                        window_z(acc.counts, ref.probs, ref.n_ref, acc.noise, upper) for _, ref, acc, _ in due
                    ]
            except Exception:  # find the unit at fault, one by one
                zs = self._z_one_by_one(signal, due, upper)
            for (us, _ref, acc, _g), z in zip(due, zs, strict=True):
                if z is not None:
                    self._advance(us, signal, z, acc, z < quiet_z, 0.0)

    def _z_one_by_one(
        self, signal: str, due: list[tuple[UnitSig, SignalRef, Acc, str]], upper: int | None
    ) -> list[float | None]:
        """The z-scores of ``due`` one at a time; a window whose test raises quarantines its
        group's signal (None in its place)."""
        out: list[float | None] = []
        for _us, ref, acc, gkey in due:
            g = self.groups.get(gkey)
            if g is None or signal in g.quarantine:
                out.append(None)
                continue
            try:
                out.append(window_z(acc.counts, ref.probs, ref.n_ref, acc.noise, upper))
            except Exception as exc:  # state-level poison, see _quarantine
                self._quarantine(g, signal, exc)
                out.append(None)
        return out

    # -- quarantine (state-level poison) -------------------------------------------------------

    def take_quarantines(self) -> list[tuple[Group, str, str]]:
        """``(group, signal, reason)`` of the signals quarantined since the last call."""
        out, self._quarantined = self._quarantined, []
        return out

    def _quarantine(self, g: Group, signal: str, exc: BaseException) -> None:
        """When the accumulated state of one (fleet, model, signal) breaks a test (e.g. a
        one-class reference: χ² with 0 degrees of freedom), drop that signal's state in the
        group and its node units, skip the signal for ``QUARANTINE_ROUNDS`` rounds, then
        rebuild it from the windows after. Ingest and counting go on; other signals and
        groups are untouched."""
        reason = f"{type(exc).__name__}: {exc}"[:300]
        g.quarantine[signal] = g.rounds + QUARANTINE_ROUNDS
        g.quarantine_reason[signal] = reason
        g.fleet_sig.pop(signal, None)
        g.round.pop(signal, None)
        g.warm.pop(signal, None)
        pending = self._round_pending.get(g.key)
        if pending is not None:
            pending.pop(signal, None)
        due = self._tests.get(signal)
        if due:
            self._tests[signal] = [t for t in due if t[3] != g.key]
        for node, unit in self._group_units(g).items():
            unit.sig.pop(signal, None)
            unit.acc.pop(signal, None)
            unit.warm.pop(signal, None)
            unit.refs.pop(signal, None)
            self._dirty_units.add((g.key, node))
        self._dirty_groups.add(g.key)
        self._quarantined.append((g, signal, reason))
        log.warning(
            "drift_signal_quarantined",
            group=g.key,
            signal=signal,
            reason=reason,
            rebuild_at_round=g.quarantine[signal],
        )

    def _lift_quarantine(self, g: Group) -> None:
        for signal, until in list(g.quarantine.items()):
            if g.rounds >= until:
                del g.quarantine[signal]
                g.quarantine_reason.pop(signal, None)
                log.info("drift_signal_rebuilding", group=g.key, signal=signal)

    def _advance(self, us: UnitSig, signal: str, z: float, acc: Acc, quiet: bool, effect: float) -> None:
        was_zero = us.s <= 0
        s = us.s + z - self._cfg.cusum_allowance
        us.s = s if s > 0 else 0.0
        if s > 0 or us.open:
            # ``acc`` is handed over (the caller never touches it again, and Acc.add/merge
            # build new lists), so it can become the run without a copy.
            if was_zero or us.run is None:
                us.run = acc
            else:
                us.run.merge(acc)
        else:
            us.run = None
        if us.open and len(us.opened_probs) == len(acc.counts):
            try:
                self._advance_change(us, signal, acc)
            except Exception as exc:  # a broken episode state: no new-episode test for it
                log.warning("drift_change_state_dropped", signal=signal, error=repr(exc)[:200])
                us.opened_probs = []
                us.s2 = 0.0
                us.run2 = None
        us.quiet = us.quiet + 1 if quiet else 0
        us.last = acc.counts
        us.last_n = acc.n
        us.last_noise = acc.noise
        us.last_effect = effect
        us.fresh = True

    def _flush_round(self, g: Group) -> None:
        """Add the round's pending windows into ``g.round`` (see ``_round_pending``)."""
        pending = self._round_pending.pop(g.key, None)
        if not pending:
            return
        for signal, windows in list(pending.items()):
            try:
                self._flush_signal(g, signal, windows)
            except Exception as exc:  # state-level poison, see _quarantine
                self._quarantine(g, signal, exc)

    def _flush_signal(
        self, g: Group, signal: str, windows: list[tuple[list[float], float, datetime, datetime]]
    ) -> None:
        cells = len(windows[0][0])
        if any(len(w[0]) != cells for w in windows):
            raise ValueError(f"{signal}: windows of different cell counts in one round")
        sums = [sum(col) for col in zip(*[w[0] for w in windows], strict=True)]
        racc = g.round.get(signal)
        if racc is None:
            racc = g.round[signal] = Acc(counts=sums, total=sum(sums), windows=0)
            racc.noise = windows[0][1]
            rest = windows[1:]
        else:
            if len(racc.counts) != cells:
                raise ValueError(f"{cells} cells added to an accumulator of {len(racc.counts)}")
            racc.counts = [a + b for a, b in zip(racc.counts, sums, strict=True)]
            racc.total += sum(sums)
            rest = windows
        for w in rest:
            racc.noise += w[1]
        racc.windows += len(windows)
        for _counts, _noise, start, end in windows:
            if racc.start is None or start < racc.start:
                racc.start = start
            if racc.end is None or end > racc.end:
                racc.end = end

    def _quorate(self, g: Group) -> bool:
        """Whether the round being closed holds enough of the fleet to stand for it: at least
        ``_QUORUM_SHARE`` of the most nodes in a round closed over the last one to two
        ``_QUORUM_SECONDS`` of the detector's clock (two periods' maxima are kept,
        ``Group.round_sizes``). A smaller round (a few nodes draining their outboxes while
        the rest are silent) is still closed for its nodes' tests, but its pool is not the
        fleet's: a fleet test of it would judge its composition, not the traffic. The memory
        is in clock time, not rounds: a drain closes rounds much faster than the windows'
        cadence, so a count of rounds would forget the fleet within one drain."""
        in_round = self._round_sets.get(g.key)
        size = len(in_round) if in_round is not None else len(set(g.round_nodes))
        quorate = size >= _QUORUM_SHARE * max(g.round_sizes, default=0)
        now = self._clock().timestamp()
        if g.round_sizes_since is None or not g.round_sizes:
            g.round_sizes, g.round_sizes_since = [size], now
        elif now - g.round_sizes_since >= _QUORUM_SECONDS:
            g.round_sizes, g.round_sizes_since = [g.round_sizes[-1], size], now
        else:
            g.round_sizes[-1] = max(g.round_sizes[-1], size)
        return quorate

    def _close_round(self, g: Group) -> list[DriftEvent]:
        cfg = self._cfg
        self._run_tests()
        self._flush_round(g)
        quorate = self._quorate(g)
        healthy = quorate and g.baseline_id == "" and self._healthy(g)
        warmed = False
        for signal, acc in list(g.round.items()):
            ref = g.refs.get(signal)
            if quorate and ref is not None and acc.n >= cfg.min_count:
                us = g.fleet_sig.get(signal)
                if us is None:
                    us = g.fleet_sig[signal] = UnitSig()
                try:
                    self._step(us, signal, ref, acc, fleet=True)
                except Exception as exc:  # state-level poison
                    self._quarantine(g, signal, exc)
                    continue
            if healthy and acc.n >= cfg.min_count and signal not in g.quarantine:
                warm = g.warm.get(signal)
                if warm is None or len(warm.counts) != len(acc.counts):
                    warm = g.warm[signal] = Acc.empty(len(acc.counts))
                warm.merge(acc)
                warmed = True
        self._history.append(RoundRecord.of(g, self._clock()))
        if len(self._history) > _HISTORY_MAX:  # nobody takes them (a bench): keep the newest
            del self._history[: _HISTORY_MAX // 2]
        events: list[DriftEvent] = []
        if warmed:
            g.warm_rounds += 1
            if g.warm_rounds >= cfg.warmup_rounds:
                pooled, g.warm = g.warm, {}
                events += self._accept_baseline(g, pooled, "auto")
        family: list[tuple[str | None, str, UnitSig, SignalRef]] = [
            (None, s, us, g.refs[s]) for s, us in g.fleet_sig.items() if us.fresh
        ]
        for node in dict.fromkeys([*g.round_nodes, *g.late_nodes]):
            unit = self.units.get((g.key, node))
            if unit is not None:
                family += [(node, s, us, unit.refs[s]) for s, us in unit.sig.items() if us.fresh]
        if family:
            pis = []
            keys: dict[tuple[str, bool], str] = {}  # one calibration key string per signal/scope
            bad: list[int] = []
            for i, (unit_node, signal, us, ref) in enumerate(family):
                if signal in g.quarantine:
                    bad.append(i)
                    pis.append(1.0)
                    continue
                if us.s <= 0:
                    # A CUSUM at zero has p = 1 under any calibration (``tail(0)``, and the
                    # fallback's too): no lookup. About half the family, stationary.
                    us.pi = 1.0
                    pis.append(1.0)
                    continue
                # Node baselines share one calibration per signal: the null shape of z
                # depends on the cell count and window size far more than on the exact mix.
                is_node = unit_node is not None
                shared = g.refs.get(signal, ref) if is_node else ref
                key = keys.get((signal, is_node))
                if key is None:
                    key = keys[signal, is_node] = f"{g.key}/{signal}/{'node' if is_node else 'fleet'}"
                try:
                    cal = self._cal.get(
                        key,
                        shared.probs,
                        us.last_n,
                        ref.n_ref,
                        us.last_noise,
                        ONE_SIDED.get(signal),
                        baseline_windows=cfg.node_baseline_windows if unit_node is not None else 0,
                    )
                    us.pi = cal.tail(us.s) if cal is not None else self._fallback_tail(us.s)
                except Exception as exc:  # state-level poison
                    self._quarantine(g, signal, exc)
                    bad.append(i)
                    us.pi = 1.0
                pis.append(us.pi)
            # Change points of open episodes join the same family (one more hypothesis each:
            # "this unit moved on from the state its open event was raised in").
            changes = [m for m in family if m[2].open and m[2].s2 > 0 and m[1] not in g.quarantine]
            for unit_node, signal, us, _ref in changes:
                try:
                    cal = self._cal.get(
                        f"{g.key}/{signal}/change/{unit_node or '_'}/{us.episode}",
                        us.opened_probs,
                        us.last_n,
                        us.opened_n,
                        us.last_noise,
                        ONE_SIDED.get(signal),
                    )
                    us.pi2 = cal.tail(us.s2) if cal is not None else self._fallback_tail(us.s2)
                except Exception as exc:  # state-level poison
                    self._quarantine(g, signal, exc)
                    us.pi2 = 1.0
                pis.append(us.pi2)
            q = round_level(cfg, g.round_node_windows, g.window_s)
            rejected = benjamini_hochberg(pis, q)
            moved = {id(m[2]) for m, rej in zip(changes, rejected[len(family) :], strict=True) if rej}
            skip = set(bad)
            for i, ((unit_node, signal, us, ref), rej) in enumerate(
                zip(family, rejected[: len(family)], strict=True)
            ):
                us.fresh = False
                if i in skip or signal in g.quarantine:
                    continue
                try:
                    new = self._new_episode(g, unit_node, signal, us, ref) if id(us) in moved else None
                    if new is not None:
                        events += new
                    elif rej or us.open:  # else _hysteresis has nothing to do (the common case)
                        events += self._hysteresis(g, unit_node, signal, us, ref, rej)
                except Exception as exc:  # state-level poison
                    self._quarantine(g, signal, exc)
        if g.round_ends:
            # The window time this round stood for: later windows at or before it are late.
            # Never past the detector's own clock less one window: the window times are the
            # nodes' clocks, and a node whose clock runs ahead, draining its backlog alone,
            # would otherwise carry the frontier past every honest node's windows for good.
            frontier = min(
                statistics.median_low(g.round_ends), self._clock().timestamp() - max(g.window_s, 1.0)
            )
            if g.frontier is None or frontier > g.frontier:
                g.frontier = frontier
        g.round = {}
        g.round_nodes = []
        g.round_ends = []
        g.late_nodes = []
        in_round = self._round_sets.get(g.key)
        if in_round is not None:
            in_round.clear()
        late = self._late_sets.get(g.key)
        if late is not None:
            late.clear()
        g.round_node_windows = 0
        g.rounds += 1
        return events

    @staticmethod
    def _effect(counts: list[float], ref: SignalRef) -> float:
        """Total-variation distance beyond what sampling noise alone gives (of these counts
        and of the reference's): the minimum effect size gates *real* differences."""
        n = sum(c for c in counts if c > 0)
        return max(0.0, total_variation(counts, ref.probs) - noise_tv(ref.probs, n, ref.n_ref))

    def _fallback_tail(self, s: float) -> float:
        """Until a signal is calibrated: the stationary tail of a CUSUM with N(0, 1)
        increments, ``exp(-2k·s)``, its slope flattened by 10% (the calibrated tails measured
        steeper than this for every signal shape tried, so it errs towards fewer events)."""
        return min(1.0, math.exp(-1.8 * self._cfg.cusum_allowance * s))

    def _hysteresis(
        self, g: Group, node: str | None, signal: str, us: UnitSig, ref: SignalRef, rejected: bool
    ) -> list[DriftEvent]:
        cfg = self._cfg
        if not us.open and not rejected:
            return []  # the common case, decided before computing anything
        effect = self._effect(us.run.counts, ref) if us.run is not None else 0.0
        if node is None:
            # A fleet unit's evidence run can reach far back (a large fleet differs a little
            # from any reference, so its CUSUM rarely sits at zero); its last window alone is
            # large enough to measure the effect now.
            effect = max(effect, self._effect(us.last, ref))
        if us.open:
            if us.quiet >= cfg.resolve_windows:
                event = self._event(g, node, signal, us, ref, "resolved", effect)
                us.open = False
                us.s = 0.0
                us.run = None
                us.quiet = 0
                us.opened_probs = []
                us.s2 = 0.0
                us.run2 = None
                if node is None:
                    self._reset_nodes(g, signal)
                return [event]
            sev = self._severity(effect)
            if rejected and _RANK[sev] > _RANK[us.severity]:
                us.updates += 1
                us.severity = sev
                return [self._event(g, node, signal, us, ref, "updated", effect)]
            return []
        if not rejected or effect < cfg.min_effect or us.s <= 0:
            return []
        if node is not None:
            fleet_us = g.fleet_sig.get(signal)
            if fleet_us is not None and fleet_us.open:
                return []  # the fleet-wide event already covers this node
        if node is None:
            # Baselines being learnt now likely hold the shift's first windows: start over.
            for unode, unit in self._group_units(g).items():
                if unit.warm.pop(signal, None) is not None:
                    self._dirty_units.add((g.key, unode))
        us.open = True
        if node is not None:
            self._maybe_open.setdefault(g.key, set()).add(node)
        us.episode += 1
        us.updates = 0
        us.quiet = 0
        us.severity = self._severity(effect)
        self._remember_open(us, node)
        event = self._event(g, node, signal, us, ref, "opened", effect)
        us.event_id = event.id
        return [event]

    @staticmethod
    def _remember_open(us: UnitSig, node: str | None) -> None:
        """The state the episode opens in: a fleet's last (pooled, large) window, a node's
        evidence run. Later windows are tested against it for a new episode."""
        counts = us.last if node is None or us.run is None else us.run.counts
        us.opened_counts = list(counts)
        us.opened_windows = 1
        us.opened_probs = normalise(counts)
        us.opened_n = sum(c for c in counts if c > 0)
        us.s2 = 0.0
        us.run2 = None
        us.pi2 = 1.0

    def _advance_change(self, us: UnitSig, signal: str, acc: Acc) -> None:
        """The change-point CUSUM of an open unit: this window against ``opened_probs``."""
        z2 = window_z(acc.counts, us.opened_probs, us.opened_n, acc.noise, ONE_SIDED.get(signal))
        was_zero = us.s2 <= 0
        s2 = us.s2 + z2 - self._cfg.cusum_allowance
        us.s2 = s2 if s2 > 0 else 0.0
        if s2 > 0:
            if was_zero or us.run2 is None:
                us.run2 = acc.copy()
            else:
                us.run2.merge(acc)
        else:
            us.run2 = None
            if us.opened_windows < _OPENED_WINDOWS and len(us.opened_counts) == len(acc.counts):
                # No sign of a further change: this window refines the estimate of the state
                # the episode is in (one window alone is a noisy reference).
                us.opened_counts = [a + b for a, b in zip(us.opened_counts, acc.counts, strict=True)]
                us.opened_windows += 1
                us.opened_probs = normalise(us.opened_counts)
                us.opened_n = sum(c for c in us.opened_counts if c > 0)

    def _new_episode(
        self, g: Group, node: str | None, signal: str, us: UnitSig, ref: SignalRef
    ) -> list[DriftEvent] | None:
        """A significant change point while an episode is open (BH rejected ``s2``) opens a new
        episode when the unit moved on by at least ``min_effect`` (total variation, net of
        sampling noise) **and** not back towards the reference: with ``d₀ = opened − ref`` and
        ``d = now − ref``, split ``d = α·d₀ + r``; a new episode needs a larger shift along
        the same direction (``(α − 1)·½|d₀|₁ ≥ min_effect``) or one in another direction
        (``½|r|₁`` net of noise ``≥ min_effect``). Otherwise the open episode carries on."""
        cfg = self._cfg
        counts = us.last if node is None or us.run2 is None else us.run2.counts
        n = sum(c for c in counts if c > 0)
        opened = SignalRef(probs=us.opened_probs, n_ref=us.opened_n, source="opened")
        moved = self._effect(counts, opened)
        now_p = normalise(counts)
        d0 = [a - b for a, b in zip(us.opened_probs, ref.probs, strict=True)]
        d = [a - b for a, b in zip(now_p, ref.probs, strict=True)]
        dd = sum(x * x for x in d0)
        alpha = sum(x * y for x, y in zip(d, d0, strict=True)) / dd if dd > 0 else 0.0
        larger = (alpha - 1) * 0.5 * sum(abs(x) for x in d0)
        other = 0.5 * sum(abs(x - alpha * y) for x, y in zip(d, d0, strict=True))
        other -= noise_tv(us.opened_probs, n, us.opened_n)
        if moved < cfg.min_effect or max(larger, other) < cfg.min_effect:
            return None  # the open episode carries on (``_hysteresis``)
        previous = us.event_id
        us.episode += 1
        us.updates = 0
        us.quiet = 0
        us.s = max(us.s, us.s2)
        us.run = us.run2 if us.run2 is not None else us.run
        effect = self._effect(counts, ref)
        us.severity = self._severity(effect)
        how = "further in the same direction" if larger >= other else "in another direction"
        self._remember_open(us, node)
        event = self._event(g, node, signal, us, ref, "opened", effect)
        event.supersedes = previous or None
        event.summary = f"{event.summary}; a new change {how} while {previous or 'an event'} was open"
        us.event_id = event.id
        log.info("drift_new_episode", group=g.key, node=node, signal=signal, moved=round(moved, 4), how=how)
        return [event]

    def _reset_nodes(self, g: Group, signal: str) -> None:
        """A fleet-wide episode is over: the evidence its nodes gathered meanwhile was the
        fleet's (their own events were suppressed), so it must not open node events now."""
        for node, unit in self._group_units(g).items():
            us = unit.sig.get(signal)
            if us is not None and not us.open:
                us.s = 0.0
                us.run = None
                self._dirty_units.add((g.key, node))

    def _severity(self, effect: float) -> str:
        if effect >= 5 * self._cfg.min_effect:
            return "critical"
        if effect >= 2 * self._cfg.min_effect:
            return "warning"
        return "info"

    def _event(
        self, g: Group, node: str | None, signal: str, us: UnitSig, ref: SignalRef, state: str, effect: float
    ) -> DriftEvent:
        sigs = g.fleet_sig if node is None else self.units[(g.key, node)].sig
        return build_event(g, node, signal, us, ref, state, effect, sigs=sigs, now=self._clock())


_RANK = {"": 0, "info": 1, "warning": 2, "critical": 3}
#: Rounds a quarantined signal is skipped before it is rebuilt from the windows after.
QUARANTINE_ROUNDS = 50
#: Skew needs z ≥ 5 (one-sided p ≈ 3e-7) on the pooled first rounds as well as the minimum
#: effect: it is one test per signal and group, and its pooled counts are large.
_SKEW_Z = 5.0
#: A round is tested as the fleet's when it holds at least this share of the most nodes seen
#: in a round over the last one to two ``_QUORUM_SECONDS`` (``DriftDetector._quorate``).
_QUORUM_SHARE = 0.5
_QUORUM_SECONDS = 3600.0
#: Windows pooled at most into the estimate of the state an open episode is in.
_OPENED_WINDOWS = 10
#: Closed rounds kept for ``take_rounds`` between two calls.
_HISTORY_MAX = 4096
#: From this many windows of a signal on, ``window_z_rows`` beats ``window_z`` (measured: 1.6
#: against 3.6 µs per window at 200 rows, break-even near 30).
_ROWS_MIN = 32
