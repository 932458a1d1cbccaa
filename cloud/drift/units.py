"""The detector's state: plain msgspec Structs, so the service persists exactly the groups and
node units a batch touched (``DriftDetector.take_dirty``) and reloads them on takeover.

A *group* is one (fleet, model name, version, variant): its references, the round being
pooled and the fleet-wide evidence. A *node unit* is one node of a group: its carried-over
counts, its own baseline and its evidence per signal (``UnitSig``).
"""

from __future__ import annotations

import msgspec

from slmops.cloud.drift.labelshift import confusion_matrix
from slmops.cloud.drift.signals import Acc, SignalRef, manifest_refs, mean_of_histogram
from slmops.shared.messages import ModelManifest, ModelRef

__all__ = ["Group", "NodeUnit", "UnitSig", "group_key", "new_group"]


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
    round_node_windows: int = 0
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


def new_group(fleet: str, model: ModelRef, manifest: ModelManifest | None) -> Group:
    g = Group(key=group_key(fleet, model), fleet=fleet, model=model)
    if manifest is not None:
        g.labels = list(manifest.labels)
        g.edges = {
            "confidence": list(manifest.edges.confidence),
            "input_length": list(manifest.edges.input_length),
            "latency": list(manifest.edges.latency_ms),
        }
        g.refs = manifest_refs(manifest)
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
