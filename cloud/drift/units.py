"""The detector's state: plain msgspec Structs, so the service persists exactly the groups and
node units a batch touched (``DriftDetector.take_dirty``) and reloads them on takeover.

A *group* is one (fleet, model name, version, variant): its references, the round being
pooled and the fleet-wide evidence. A *node unit* is one node of a group: its carried-over
counts, its own baseline and its evidence per signal (``UnitSig``).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from slmops.cloud.drift.labelshift import confusion_matrix
from slmops.cloud.drift.signals import Acc, SignalRef, manifest_refs, mean_of_histogram
from slmops.shared.messages import ModelManifest, ModelRef

__all__ = ["Group", "NodeUnit", "RoundRecord", "UnitSig", "group_key", "new_group"]


def group_key(fleet: str, model: ModelRef) -> str:
    return f"{fleet}/{model.name}/{model.version}/{model.variant}"


class UnitSig(msgspec.Struct, kw_only=True):
    """Evidence and event state of one signal of one unit (the fleet, or one node)."""

    s: float = 0.0
    run: Acc | None = None  #: counts since S last left zero
    last: list[float] = []  #: counts of the last window tested
    last_n: float = 0.0
    last_noise: float = 0.0
    last_effect: float = 0.0
    quiet: int = 0
    fresh: bool = False  #: tested in the current round
    pi: float = 1.0
    open: bool = False
    episode: int = 0
    updates: int = 0
    severity: str = ""
    #: While open: the distribution when the episode opened (``opened_n`` counts), and a
    #: second CUSUM ``s2`` of later windows against it, the change-point evidence for a new
    #: episode (``DriftDetector._new_episode``); ``run2`` its counts since it left zero.
    opened_probs: list[float] = []
    opened_n: float = 0.0
    opened_counts: list[float] = []
    opened_windows: int = 0
    s2: float = 0.0
    run2: Acc | None = None
    pi2: float = 1.0
    event_id: str = ""  #: id of the open episode's "opened" event


class NodeUnit(msgspec.Struct, kw_only=True):
    acc: dict[str, Acc] = {}
    sig: dict[str, UnitSig] = {}
    #: The node's own baseline per signal (its first tested windows), see the module docstring.
    refs: dict[str, SignalRef] = {}
    warm: dict[str, Acc] = {}


class Group(msgspec.Struct, kw_only=True):
    key: str
    fleet: str
    model: ModelRef
    labels: list[str] = []
    edges: dict[str, list[float]] = {}
    refs: dict[str, SignalRef] = {}
    warm: dict[str, Acc] = {}
    warm_rounds: int = 0
    round: dict[str, Acc] = {}
    round_nodes: list[str] = []
    #: ``window_end`` (POSIX seconds) of each window in the round, in ``round_nodes`` order:
    #: their median becomes ``frontier`` when the round closes.
    round_ends: list[float] = []
    round_node_windows: int = 0
    #: Window time (POSIX seconds) of the last closed round: an aggregate whose window ends at
    #: or before it is late (node evidence only, ``DriftDetector``). None until a round closes
    #: (and in state written before issue 18: every window is then current, as before).
    frontier: float | None = None
    #: Nodes that sent a late window since the last round close (each once): their units join
    #: the next round's BH family.
    late_nodes: list[str] = []
    #: The most nodes in a round closed in the previous and the current hour of the
    #: detector's clock (``[previous, current]``), and when the current hour began (POSIX
    #: seconds): a round with under half of their maximum is not tested as the fleet
    #: (``DriftDetector._quorate``).
    round_sizes: list[int] = []
    round_sizes_since: float | None = None
    #: Length in seconds of the windows of the round being closed (its aggregates'
    #: ``window_end - window_start``; 60 until one is seen): rounds per day for the BH level.
    window_s: float = 60.0
    rounds: int = 0
    fleet_sig: dict[str, UnitSig] = {}
    joint: list[list[float]] | None = None
    confusion_source: str = ""
    ref_accuracy: float | None = None
    ref_mean_conf: float | None = None
    #: Quarantined signals (state-level poison, ``DriftDetector._quarantine``): signal -> the
    #: round from which it is rebuilt from later windows, and why it was quarantined.
    quarantine: dict[str, int] = {}
    quarantine_reason: dict[str, str] = {}
    #: The manifest's references (skew is checked against them once; ``refs`` holds what
    #: the fleet is tested against: the production baseline, see ``DriftDetector``).
    manifest_refs: dict[str, SignalRef] = {}
    #: Baselines accepted so far (automatic or set by an analyst); ids are ``<source>-<n>``.
    baselines: int = 0
    baseline_id: str = ""
    skew_checked: bool = False


def new_group(fleet: str, model: ModelRef, manifest: ModelManifest | None) -> Group:
    g = Group(key=group_key(fleet, model), fleet=fleet, model=model)
    if manifest is not None:
        g.labels = list(manifest.labels)
        g.edges = {
            "confidence": list(manifest.edges.confidence),
            "input_length": list(manifest.edges.input_length),
            "latency": list(manifest.edges.latency_ms),
        }
        if manifest.generation is not None:
            g.edges["output_tokens"] = list(manifest.generation.edges.output_tokens)
        g.manifest_refs = manifest_refs(manifest)
        ref = manifest.reference
        if ref is not None:
            g.ref_accuracy = ref.accuracy
            if ref.confusion:
                g.confusion_source = "manifest_confusion"
                g.joint = confusion_matrix(g.labels, ref.confusion, None).tolist()
            g.ref_mean_conf = mean_of_histogram(
                [float(c) for c in ref.confidence.counts], ref.confidence.edges
            )
    return g


class RoundRecord(msgspec.Struct, kw_only=True):
    """One closed fleet round of a group: its pooled counts per signal (the round history
    that plots and analyst baselines read), and the group's references' sources then."""

    group: str
    round: int
    start: datetime | None
    end: datetime | None
    closed: datetime
    signals: dict[str, Acc]
    references: dict[str, str] = {}

    @classmethod
    def of(cls, g: Group, now: datetime) -> RoundRecord:
        starts = [a.start for a in g.round.values() if a.start is not None]
        ends = [a.end for a in g.round.values() if a.end is not None]
        return cls(
            group=g.key,
            round=g.rounds,
            start=min(starts, default=None),
            end=max(ends, default=None),
            closed=now,
            signals={k: a.copy() for k, a in g.round.items()},
            references={k: r.source for k, r in g.refs.items()},
        )
