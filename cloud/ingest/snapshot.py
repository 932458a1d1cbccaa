"""The fleet state for analysts: one JSON value per node in the KV bucket ``slmops_fleet``.

Key ``<fleet>.<node>``. The active cloud instance writes the nodes a batch changed, at most
every ``snapshot_interval`` seconds, so ``slmops fleet status`` needs no running query service
and works with the cloud stopped (it shows the last state written). Values are
``NodeSnapshot`` JSON; the bucket keeps one revision per key.
"""

from __future__ import annotations

from datetime import datetime

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from slmops.cloud.ingest.state import InstallEpoch, NodeState
from slmops.shared import names
from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.jetstream import ensure_kv, nats_errors

__all__ = ["FLEET_BUCKET", "NodeSnapshot", "SnapshotWriter", "ensure_fleet_bucket", "notes_of", "snapshot_of"]

log = structlog.get_logger(__name__)

FLEET_BUCKET = names.FLEET_BUCKET
#: A node clock this far off the server's (seconds) is named in ``fleet status`` notes.
SKEW_NOTE_S = 60.0


class NodeSnapshot(msgspec.Struct, kw_only=True):
    """One node as ``slmops fleet status --json`` shows it."""

    node: str
    fleet: str
    model: str | None
    model_version: int | None
    variant: str | None
    last_seen: datetime | None
    last_window_end: datetime | None
    inferences: int
    errors: int
    windows: int
    aggregates: int
    duplicates: int
    late: int
    seq_high: int
    missing_seqs: int
    missing_ranges: list[tuple[int, int]]
    gaps: int
    abandoned_seqs: int
    dropped_inferences: int
    dropped_aggregates: int
    outbox_depth: int
    served: int
    status_event: str | None
    status_time: datetime | None
    last_error: str | None
    device: str | None
    arch: str | None
    cores: int | None
    memory_mb: int | None
    #: What the node's runtime can run (empty: an old node, n-gram classifiers only).
    capabilities: list[str] = []
    #: The last bundle it refused as one its runtime cannot run, with the reason.
    cannot_run: str | None = None
    #: Aggregates of a model the registry does not know (counted, not drift-tested).
    unregistered: int = 0
    #: "unregistered model" when the node's latest aggregates are of such a model.
    model_note: str | None = None
    #: What needs an operator's look, one phrase each (e.g. "unregistered model").
    notes: list[str] = []
    #: The install (seq epoch) of the node's latest new epoch, how many epochs it had, install
    #: pairs seen live at once on this node id, and aggregates that repeated an applied
    #: (install, seq) with other content (a cloned device).
    install: str = ""
    installs: int = 0
    install_conflicts: list[str] = []
    clones: int = 0
    #: The node's clock minus the server's at its latest status report (seconds; positive =
    #: the node runs ahead), and the server time of that report.
    clock_skew_s: float | None = None
    status_stored: datetime | None = None
    #: From the node's latest status (``NodeState``): the signed key list version it holds
    #: (0: none) and its pushed configuration's version in effect, last version seen, that
    #: version's state ("applied", "probation", "rejected", "rolled_back"; "" = not said) and
    #: the reason of a refusal or rollback.
    key_list_version: int = 0
    config_version: int | None = None
    config_seen: int | None = None
    config_state: str = ""
    config_reason: str | None = None


def snapshot_of(n: NodeState) -> NodeSnapshot:
    dev = n.device
    epochs = list(n.epochs.values()) or [InstallEpoch(seqs=n.seqs)]
    current = n.epochs.get(n.install) or epochs[-1]
    return NodeSnapshot(
        node=n.node,
        fleet=n.fleet,
        model=n.model.name if n.model else None,
        model_version=n.model.version if n.model else None,
        variant=n.model.variant if n.model else None,
        last_seen=n.last_seen,
        last_window_end=n.last_window_end,
        inferences=n.inferences,
        errors=n.errors,
        windows=n.windows,
        aggregates=n.aggregates,
        duplicates=n.duplicates,
        late=n.late,
        seq_high=current.seqs.high,
        missing_seqs=sum(e.seqs.missing for e in epochs),
        missing_ranges=current.seqs.missing_ranges(),
        gaps=sum(e.seqs.gaps_opened for e in epochs),
        abandoned_seqs=sum(e.seqs.abandoned for e in epochs),
        dropped_inferences=max(n.dropped_inferences, n.status_dropped_inferences),
        dropped_aggregates=max(n.dropped_aggregates, n.status_dropped_aggregates),
        outbox_depth=n.outbox_depth,
        served=n.served,
        status_event=n.status_event,
        status_time=n.status_time,
        last_error=n.last_error,
        device=dev.profile or None if dev else None,
        arch=dev.arch or None if dev else None,
        cores=dev.cores if dev else None,
        memory_mb=dev.memory_mb if dev else None,
        capabilities=list(dev.capabilities) if dev else [],
        cannot_run=n.cannot_run,
        unregistered=n.unregistered,
        model_note="unregistered model" if n.model_registered is False else None,
        notes=notes_of(n),
        install=n.install,
        installs=len([k for k in n.epochs if k]),
        install_conflicts=list(n.conflicts),
        clones=n.clones,
        clock_skew_s=n.clock_skew_s,
        status_stored=n.status_stored,
        key_list_version=n.key_list_version,
        config_version=n.config_version,
        config_seen=n.config_seen,
        config_state=n.config_state,
        config_reason=n.config_reason,
    )


def notes_of(n: NodeState) -> list[str]:
    """Short phrases for ``fleet status`` about what is off with a node."""
    out = []
    if n.model_registered is False:
        out.append("unregistered model")
    if n.conflicts:
        out.append(f"install conflict ({len(n.conflicts)}): two devices on one node id?")
    if n.clones:
        out.append(f"cloned device ({n.clones} repeated seqs with other content)")
    if n.clock_skew_s is not None and abs(n.clock_skew_s) >= SKEW_NOTE_S:
        out.append(f"clock skew {n.clock_skew_s:+.0f} s")
    if n.config_state in ("rejected", "rolled_back"):
        why = f": {n.config_reason[:120]}" if n.config_reason else ""
        out.append(f"config v{n.config_seen} {n.config_state.replace('_', ' ')}{why}")
    return out


async def ensure_fleet_bucket(js: JetStreamContext) -> KeyValue:
    """The ``slmops_fleet`` bucket, created if missing (idempotent, concurrent-safe)."""
    return await ensure_kv(js, FLEET_BUCKET)


_enc = msgspec.json.Encoder()


class SnapshotWriter:
    """Writes the nodes marked dirty to KV, every ``interval`` seconds."""

    def __init__(self, kv: KeyValue, nodes: dict[tuple[str, str], NodeState], interval: float) -> None:
        self._kv = kv
        self._nodes = nodes
        self._interval = interval
        self._dirty: set[tuple[str, str]] = set()
        self.writes = 0

    def mark(self, keys: set[tuple[str, str]] | list[tuple[str, str]]) -> None:
        self._dirty.update(keys)

    async def flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            n = self._nodes.get(key)
            if n is None:
                continue
            name = f"{n.fleet}.{n.node}"
            try:
                with nats_errors("kv key", name), anyio.fail_after(5):
                    await self._kv.put(name, _enc.encode(snapshot_of(n)))
                self.writes += 1
            except (NatsUnavailable, JetStreamRefused) as exc:
                self._dirty.add(key)  # try again next round
                log.warning("fleet_snapshot_failed", fleet=n.fleet, node=n.node, error=str(exc))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await anyio.sleep(self._interval)
                await self.flush()
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.flush()
