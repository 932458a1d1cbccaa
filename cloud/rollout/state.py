"""Rollout state: what a staged rollout is doing, persisted in KV ``slmops_rollouts`` (key = fleet).

The state is the only memory a controller has: every transition is written (compare-and-set on
the key's revision) before its effects, so a controller killed at any instant resumes from the
state on restart, and two controllers never both drive one rollout — the second one's write is
refused and it re-reads. Operators' commands (pause/resume/abort) are written into the same
key's ``command`` field, also with compare-and-set, and applied at the controller's next step.
Events not yet published travel in ``pending`` with their sequence number, so a restart
re-publishes them with the same ``Nats-Msg-Id`` and the stream drops the duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from slmops.cloud.config import RolloutConfig
from slmops.cloud.errors import CloudError
from slmops.shared import names
from slmops.shared.errors import NotFound, WrongLastSequence
from slmops.shared.jetstream import ensure_kv, nats_errors
from slmops.shared.kv import kv_get, kv_keys
from slmops.shared.messages import Assignment, RolloutEvent
from slmops.shared.names import validate_id
from slmops.shared.vocabulary import RolloutStatus

__all__ = [
    "ACTIVE",
    "ROLLOUTS_BUCKET",
    "TERMINAL",
    "NodeEntry",
    "PendingEvent",
    "RolloutConfig",
    "RolloutConflict",
    "RolloutError",
    "RolloutState",
    "RolloutStore",
]

log = structlog.get_logger(__name__)

#: KV bucket of rollout states, one key per fleet (created idempotently by ``RolloutStore``).
ROLLOUTS_BUCKET = names.ROLLOUTS_BUCKET

#: Where a rollout stands: the same five words the field held as a ``Literal`` (a stored
#: state encodes and validates exactly as before).
Status = RolloutStatus
Phase = Literal["assigning", "installing", "soaking", "cleanup", "done"]
Command = Literal["pause", "resume", "abort"]
ACTIVE: frozenset[str] = frozenset({RolloutStatus.RUNNING, RolloutStatus.PAUSED})
TERMINAL: frozenset[str] = frozenset(
    {RolloutStatus.COMPLETED, RolloutStatus.ROLLED_BACK, RolloutStatus.ABORTED}
)


class RolloutError(CloudError):
    """A rollout operation cannot be done as asked."""

    def __init__(self, fleet: str, reason: str) -> None:
        self.fleet = fleet
        self.reason = reason
        super().__init__(f"rollout of fleet {fleet!r}: {reason}")


class RolloutConflict(RolloutError):
    """Someone else wrote the rollout state since it was read (compare-and-set refused)."""


class NodeEntry(msgspec.Struct, kw_only=True):
    """A node the rollout assigned the new version to, and what to restore on rollback."""

    stage: int
    variant: str | None = None
    assigned_at: float
    #: The node's own assignment before the rollout (None: it followed the fleet-wide key).
    prior: Assignment | None = None


class PendingEvent(msgspec.Struct, kw_only=True):
    n: int
    event: RolloutEvent


class RolloutState(msgspec.Struct, kw_only=True):
    """One fleet's rollout. Times are Unix seconds from the controller's clock."""

    v: int = 1
    id: str
    fleet: str
    model: str
    version: int
    #: The fleet-wide version when the rollout started (None: the fleet had none).
    previous_version: int | None = None
    #: The model is served side by side (issue 11): the rollout writes its per-model keys
    #: (``<fleet>.<node>.<model>``, ``<fleet>._fleet.<model>``), not the legacy keys that
    #: name each node's default model.
    side_by_side: bool = False
    config: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    status: Status = RolloutStatus.RUNNING
    phase: Phase = "assigning"
    stage: int = 0
    created: float
    stage_started: float
    soak_started: float | None = None
    nodes: dict[str, NodeEntry] = {}
    #: Node -> why it counts as failed (rejected the bundle, rolled back on its own).
    failures: dict[str, str] = {}
    #: Node -> why no variant of the version fits its device profile (the device-fit gate,
    #: ``shared.variants.device_fit``): never assigned, not counted as a failure, and kept on
    #: what it ran when the rollout completes.
    unfit: dict[str, str] = {}
    #: An operator's command not yet applied.
    command: Command | None = None
    reason: str = ""
    #: Events numbered so far (the next one is ``events + 1``).
    events: int = 0
    pending: list[PendingEvent] = []
    gates: dict[str, object] = {}
    updated: float = 0.0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def percent(self) -> int:
        return self.config.stages[self.stage]


_decoder = msgspec.json.Decoder(RolloutState)
_encoder = msgspec.json.Encoder()


class RolloutStore:
    """Rollout states in KV: read, create, compare-and-set, command. Translates NATS errors
    into ``NatsUnavailable``/``JetStreamRefused`` (``shared.jetstream``) and ``RolloutError``."""

    def __init__(self, js: JetStreamContext, *, url: str = "<nats>", timeout: float = 10.0) -> None:
        self._js = js
        self._url = url
        self._timeout = timeout
        self._kv: KeyValue | None = None

    async def bucket(self) -> KeyValue:
        """The bucket, created on first use if missing (safe from several processes). Only
        writes call this: a read of a missing bucket finds no rollouts and creates nothing."""
        if self._kv is None:
            with nats_errors("kv bucket", ROLLOUTS_BUCKET, self._url), anyio.fail_after(self._timeout):
                self._kv = await ensure_kv(self._js, ROLLOUTS_BUCKET, history=10)
        return self._kv

    async def _existing(self) -> KeyValue | None:
        """The bucket if it exists (None: no rollout was ever written)."""
        if self._kv is None:
            try:
                with nats_errors("kv bucket", ROLLOUTS_BUCKET, self._url), anyio.fail_after(self._timeout):
                    self._kv = await self._js.key_value(ROLLOUTS_BUCKET)
            except NotFound:
                return None
        return self._kv

    async def get(self, fleet: str) -> tuple[RolloutState, int] | None:
        """The fleet's rollout and its revision, or None. A value that does not decode is
        logged and treated as absent (it is overwritten by the next rollout)."""
        key = validate_id(fleet, "fleet")
        kv = await self._existing()
        if kv is None:
            return None
        entry = await kv_get(kv, key, self._url, kind="rollout", timeout=self._timeout)
        if entry is None:  # also a deleted key
            return None
        try:
            return _decoder.decode(entry.value or b""), int(entry.revision or 0)
        except msgspec.DecodeError as exc:
            log.error("rollout_state_undecodable", fleet=fleet, error=str(exc))
            return None

    async def fleets(self) -> list[str]:
        """Fleets with a rollout key (a deleted one included: ``get`` returns None for it)."""
        try:
            with nats_errors("kv bucket", ROLLOUTS_BUCKET, self._url), anyio.fail_after(self._timeout):
                keys = await kv_keys(self._js, ROLLOUTS_BUCKET)
        except NotFound:  # no bucket: no rollout was ever written
            return []
        return sorted(keys)

    async def all(self) -> list[tuple[RolloutState, int]]:
        found = []
        for fleet in await self.fleets():
            got = await self.get(fleet)
            if got is not None:
                found.append(got)
        return found

    async def put(self, state: RolloutState, revision: int | None) -> int:
        """Write ``state`` if the key is still at ``revision`` (None: the key must not hold
        an active rollout). Returns the new revision; ``RolloutConflict`` when refused."""
        kv = await self.bucket()
        data = _encoder.encode(state)
        try:
            with nats_errors("rollout", state.fleet, self._url), anyio.fail_after(self._timeout):
                if revision is None:
                    return int(await kv.create(state.fleet, data))
                return int(await kv.update(state.fleet, data, last=revision))
        except WrongLastSequence as exc:
            raise RolloutConflict(state.fleet, "its state changed since it was read") from exc

    async def create(self, state: RolloutState) -> int:
        """Store a new rollout; refused with ``RolloutError`` while the fleet has an active one.
        A finished rollout is replaced (its events stay in the ``SLMOPS_ROLLOUT`` stream)."""
        existing = await self.get(state.fleet)
        if existing is None:
            try:
                return await self.put(state, None)
            except RolloutConflict:
                existing = await self.get(state.fleet)
                if existing is None:
                    raise
        old, revision = existing
        if old.active:
            raise RolloutError(
                state.fleet,
                f"rollout {old.id} of version {old.version} is still {old.status}; "
                "abort it first (slmops rollout abort)",
            )
        return await self.put(state, revision)

    async def modify(self, fleet: str, change: Callable[[RolloutState], RolloutState]) -> RolloutState:
        """Apply ``change`` to the current state with compare-and-set, retrying on conflict
        (operators' commands). ``RolloutError`` if the fleet has no rollout."""
        for _ in range(20):
            got = await self.get(fleet)
            if got is None:
                raise RolloutError(fleet, "there is no rollout for this fleet")
            state, revision = got
            new = change(state)
            try:
                await self.put(new, revision)
            except RolloutConflict:
                await anyio.sleep(0.05)
                continue
            return new
        raise RolloutConflict(fleet, "the state kept changing; try again")

    async def command(self, fleet: str, command: Command) -> RolloutState:
        """Record an operator's command for the controller's next step."""
        if command not in ("pause", "resume", "abort"):
            raise ValueError(f"command must be pause, resume or abort, got {command!r}")

        def change(state: RolloutState) -> RolloutState:
            if not state.active:
                raise RolloutError(fleet, f"rollout {state.id} already ended ({state.status})")
            return msgspec.structs.replace(state, command=command)

        return await self.modify(fleet, change)
