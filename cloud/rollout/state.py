"""Rollout state: what a staged rollout is doing, persisted in KV ``slmops_rollouts`` (key = fleet).

The state is the only memory a controller has: every transition is written (compare-and-set on
the key's revision) before its effects, so a controller killed at any instant resumes from the
state on restart, and two controllers never both drive one rollout — the second one's write is
refused and it re-reads. Operators' commands (pause/resume/abort) are written into the same
key's ``command`` field, also with compare-and-set, and applied at the controller's next step.
Events not yet published travel in ``pending`` with their sequence number, so a restart
re-publishes them with the same ``Nats-Msg-Id`` and the stream drops the duplicates.

The fleet's key holds the header only (a few kB whatever the fleet's size; issue 18: one value
holding every node passed KV's 1 MiB limit at ~13,000 nodes). The rollout's nodes, failures
and unfit nodes live in immutable parts of at most ``PART_SIZE`` entries under keys of their
own (``<fleet>.<rollout token>.<kind><index>``); the header counts them (``parts``), and a part
counts only once a header naming it is written. So parts are written first, then the header
(compare-and-set): a controller killed in between leaves an unnamed part that the next write
of that index replaces. A value an older cloud wrote (``v`` 1: every node inside the one
value) is read as it is and migrated into parts by the controller (``RolloutStore.migrate``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, cast

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
    "PARALLEL",
    "PART_SIZE",
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
T = TypeVar("T")

#: KV bucket of rollout states, one key per fleet (created idempotently by ``RolloutStore``).
ROLLOUTS_BUCKET = names.ROLLOUTS_BUCKET
#: Entries per part key. A node entry holding the assignment to restore is ~300 bytes of JSON
#: at most, so a part stays near 150 kB, far under KV's 1 MiB value limit.
PART_SIZE = 500
#: KV reads or writes in flight at once for one batch (parts, assignments): enough to hide
#: the round trip on loopback and a LAN, few enough not to swamp a server shared by a fleet.
PARALLEL = 32
#: Part kinds: nodes assigned, nodes failed (rejected, rolled back), nodes left out (unfit).
Kind = Literal["n", "f", "u"]
KINDS: tuple[Kind, ...] = ("n", "f", "u")

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
    #: The part (``RolloutState.parts["n"]`` index) holding this entry: assignments are
    #: written part by part, and ``RolloutState.written`` counts the parts done.
    part: int = 0


class PendingEvent(msgspec.Struct, kw_only=True):
    n: int
    event: RolloutEvent


class RolloutState(msgspec.Struct, kw_only=True):
    """One fleet's rollout. Times are Unix seconds from the controller's clock."""

    #: 1: an older cloud's value, every node inside it; 2: nodes in parts (module docstring).
    v: int = 2
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
    #: Parts written and named by this header, by kind (``KINDS``). ``nodes``, ``failures``
    #: and ``unfit`` are their merged entries in memory, never in the header itself.
    parts: dict[str, int] = {}
    #: Node parts whose assignments are all written (a resumed stage writes the rest only).
    written: int = 0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def percent(self) -> int:
        return self.config.stages[self.stage]


_decoder = msgspec.json.Decoder(RolloutState)
_encoder = msgspec.json.Encoder()
_part_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    "n": msgspec.json.Decoder(dict[str, NodeEntry]),
    "f": msgspec.json.Decoder(dict[str, str]),
    "u": msgspec.json.Decoder(dict[str, str]),
}


def part_key(state: RolloutState, kind: str, index: int) -> str:
    """KV key of one part of a rollout's state (a token of the rollout id: ids may hold
    characters keys do not)."""
    token = hashlib.sha256(state.id.encode()).hexdigest()[:16]
    return f"{state.fleet}.{token}.{kind}{index}"


def _entries(state: RolloutState, kind: str) -> dict[str, Any]:
    """The in-memory entries of ``kind`` (the state's own dict: copy before changing it)."""
    if kind == "n":
        return cast(dict[str, Any], state.nodes)
    return cast(dict[str, Any], state.failures if kind == "f" else state.unfit)


def _with(state: RolloutState, kind: str, entries: dict[str, Any], **fields: Any) -> RolloutState:
    field = {"n": "nodes", "f": "failures", "u": "unfit"}[kind]
    return msgspec.structs.replace(state, **{field: entries}, **fields)


async def bounded(items: Iterable[T], work: Callable[[T], Awaitable[None]], limit: int = PARALLEL) -> None:
    """``await work(item)`` for every item, at most ``limit`` at once; the first error
    cancels the rest and is raised."""
    pending = iter(items)
    errors: list[Exception] = []

    async def worker() -> None:
        try:
            for item in pending:  # the workers share one iterator: each item is taken once
                await work(item)
        except Exception as exc:  # raised below as itself, not wrapped in an ExceptionGroup
            errors.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for _ in range(limit):
            tg.start_soon(worker)
    if errors:
        raise errors[0]


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

    async def get(self, fleet: str, *, parts: bool = True) -> tuple[RolloutState, int] | None:
        """The fleet's rollout and its revision, or None. A value that does not decode is
        logged and treated as absent (it is overwritten by the next rollout). ``parts``:
        read its nodes, failures and unfit nodes too (False: the header alone, a few kB)."""
        key = validate_id(fleet, "fleet")
        kv = await self._existing()
        if kv is None:
            return None
        entry = await kv_get(kv, key, self._url, kind="rollout", timeout=self._timeout)
        if entry is None:  # also a deleted key
            return None
        try:
            state = _decoder.decode(entry.value or b"")
        except msgspec.DecodeError as exc:
            log.error("rollout_state_undecodable", fleet=fleet, error=str(exc))
            return None
        if parts:
            state = await self.fill(state)
        return state, int(entry.revision or 0)

    async def fill(self, state: RolloutState, known: RolloutState | None = None) -> RolloutState:
        """``state`` (a header) with the entries of every part it names. ``known``: the same
        rollout as read before; parts are immutable, so only those it lacks are read.
        Raises ``RolloutError`` when a named part is missing or does not decode."""
        if not state.parts:
            return state
        if known is not None and (
            known.id != state.id or any(known.parts.get(k, 0) > state.parts.get(k, 0) for k in KINDS)
        ):
            known = None
        for kind in KINDS:
            have = known.parts.get(kind, 0) if known is not None else 0
            count = state.parts.get(kind, 0)
            entries = _entries(known, kind) if known is not None else {}
            if count > have:
                entries = {**entries, **await self._read_parts(state, kind, range(have, count))}
            state = _with(state, kind, entries)
        return state

    async def _read_parts(self, state: RolloutState, kind: str, indices: range) -> dict[str, Any]:
        """The entries of parts ``indices`` of ``kind``, merged in index order."""
        kv = await self.bucket()
        got: dict[int, dict[str, Any]] = {}

        async def read(index: int) -> None:
            key = part_key(state, kind, index)
            entry = await kv_get(kv, key, self._url, kind="rollout part", timeout=self._timeout)
            if entry is None:
                raise RolloutError(state.fleet, f"part {key} of rollout {state.id} is missing")
            try:
                got[index] = _part_decoders[kind].decode(entry.value or b"")
            except msgspec.DecodeError as exc:
                raise RolloutError(state.fleet, f"part {key} does not decode: {exc}") from exc

        await bounded(indices, read)
        merged: dict[str, Any] = {}
        for index in indices:
            merged.update(got[index])
        return merged

    async def fleets(self) -> list[str]:
        """Fleets with a rollout key (a deleted one included: ``get`` returns None for it)."""
        try:
            with nats_errors("kv bucket", ROLLOUTS_BUCKET, self._url), anyio.fail_after(self._timeout):
                keys = await kv_keys(self._js, ROLLOUTS_BUCKET, "*")  # not the parts' keys
        except NotFound:  # no bucket: no rollout was ever written
            return []
        return sorted(keys)

    async def all(self, *, parts: bool = True) -> list[tuple[RolloutState, int]]:
        found = []
        for fleet in await self.fleets():
            got = await self.get(fleet, parts=parts)
            if got is not None:
                found.append(got)
        return found

    async def put(self, state: RolloutState, revision: int | None) -> int:
        """Write ``state`` if the key is still at ``revision`` (None: the key must not hold
        an active rollout). Returns the new revision; ``RolloutConflict`` when refused."""
        kv = await self.bucket()
        header = state if state.v < 2 else msgspec.structs.replace(state, nodes={}, failures={}, unfit={})
        data = _encoder.encode(header)
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
        existing = await self.get(state.fleet, parts=False)  # the header names its parts
        if existing is None:
            try:
                return await self.put(state, None)
            except RolloutConflict:
                existing = await self.get(state.fleet, parts=False)  # the header names its parts
                if existing is None:
                    raise
        old, revision = existing
        if old.active:
            raise RolloutError(
                state.fleet,
                f"rollout {old.id} of version {old.version} is still {old.status}; "
                "abort it first (slmops rollout abort)",
            )
        revision = await self.put(state, revision)
        await self._drop_parts(old)
        return revision

    async def _drop_parts(self, old: RolloutState) -> None:
        """Purge the parts of a rollout a new one replaced (its events stay in the stream)."""
        kv = await self.bucket()
        keys = [part_key(old, kind, i) for kind in KINDS for i in range(old.parts.get(kind, 0))]

        async def purge(key: str) -> None:
            with nats_errors("rollout part", key, self._url), anyio.fail_after(self._timeout):
                await kv.purge(key)

        await bounded(keys, purge)

    async def append(self, state: RolloutState, kind: Kind, entries: Mapping[str, Any]) -> RolloutState:
        """Write ``entries`` (node -> ``NodeEntry`` for ``"n"``, node -> reason otherwise) as
        new parts after those ``state`` names, and return ``state`` naming them and holding
        them. The parts count once the returned state is ``put``; until then a restart reads
        ``state`` without them (and the next append overwrites them)."""
        if not entries:
            return state
        if state.v < 2:
            raise RolloutError(state.fleet, "an older cloud's state: migrate it before appending")
        kv = await self.bucket()
        first = state.parts.get(kind, 0)
        ordered = sorted(entries.items())
        chunks = [dict(ordered[i : i + PART_SIZE]) for i in range(0, len(ordered), PART_SIZE)]
        if kind == "n":
            chunks = [
                {n: msgspec.structs.replace(e, part=first + i) for n, e in chunk.items()}
                for i, chunk in enumerate(chunks)
            ]

        async def write(i: int) -> None:
            key = part_key(state, kind, first + i)
            with nats_errors("rollout part", key, self._url), anyio.fail_after(self._timeout):
                await kv.put(key, _encoder.encode(chunks[i]))

        await bounded(range(len(chunks)), write)
        merged = dict(_entries(state, kind))
        for chunk in chunks:
            merged.update(chunk)
        return _with(state, kind, merged, parts={**state.parts, kind: first + len(chunks)})

    async def migrate(self, state: RolloutState, revision: int) -> tuple[RolloutState, int]:
        """An older cloud's state (``v`` 1: every node inside the one value) moved into parts
        and its header written (compare-and-set: ``RolloutConflict`` when it changed). Node
        parts hold one stage each, and the stages before the current one (all of them past
        ``assigning``) count as written. A state already in parts is returned as it is."""
        if state.v >= 2:
            return state, revision
        new = msgspec.structs.replace(state, v=2, nodes={}, failures={}, unfit={}, parts={}, written=0)
        for stage in sorted({e.stage for e in state.nodes.values()}):
            new = await self.append(new, "n", {n: e for n, e in state.nodes.items() if e.stage == stage})
            if stage < state.stage or state.phase != "assigning":
                new = msgspec.structs.replace(new, written=new.parts["n"])
        new = await self.append(new, "f", state.failures)
        new = await self.append(new, "u", state.unfit)
        revision = await self.put(new, revision)
        log.info("rollout_state_migrated", fleet=state.fleet, rollout=state.id, nodes=len(new.nodes))
        return new, revision

    async def modify(self, fleet: str, change: Callable[[RolloutState], RolloutState]) -> RolloutState:
        """Apply ``change`` to the current state with compare-and-set, retrying on conflict
        (operators' commands). ``RolloutError`` if the fleet has no rollout."""
        for _ in range(20):
            got = await self.get(fleet, parts=False)  # commands change the header only
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
