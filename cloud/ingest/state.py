"""The cloud's durable state in SQLite: fleet state, seq tracking, detector state, event outbox.

Everything a batch of aggregates changes is written in ONE transaction (``commit``); the caller
acks the batch's messages only after it returns. A crash before the commit loses nothing (the
messages are redelivered and applied again from the old state); a crash after it duplicates
nothing (the redelivered seqs are already in the stored ``SeqTracker``). Drift events are
written to an outbox table in the same transaction and published afterwards, so an event is
neither lost nor (thanks to its deterministic ``Nats-Msg-Id``) doubled.

Blobs are msgpack of the msgspec Structs below; WAL with ``synchronous=FULL`` so a commit
survives an OS crash, not only a process crash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import anyio
import msgspec

from slmops.cloud.drift.units import Group, NodeUnit, RoundRecord
from slmops.cloud.errors import StateError
from slmops.cloud.ingest.dedupe import SeqTracker
from slmops.shared.messages import DeviceProfile, ModelRef

__all__ = ["HISTORY_ROUNDS", "InstallEpoch", "NodeState", "StateStore", "StoredState"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (fleet TEXT NOT NULL, node TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (fleet, node));
CREATE TABLE IF NOT EXISTS groups (key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS units (grp TEXT NOT NULL, node TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (grp, node));
CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, subject TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (grp TEXT NOT NULL, round INTEGER NOT NULL, start TEXT, end_ TEXT,
    data BLOB NOT NULL, PRIMARY KEY (grp, round));
CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, fleet TEXT NOT NULL, time TEXT NOT NULL,
    data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS events_fleet_time ON events (fleet, time);
"""
#: Fleet rounds kept per group in the round history (the oldest are pruned): two weeks of
#: 1-minute rounds.
HISTORY_ROUNDS = 20_160


class InstallEpoch(msgspec.Struct, kw_only=True):
    """One node install's ``seq`` epoch (issue 13 fault 5): a node install numbers its
    aggregates from 1 in its own SQLite database, so a wiped database starts a new epoch.

    Blobs written before this class held only its own fields carry copies of ``NodeState``'s
    install bookkeeping (``epochs``, ``install``, ``conflicts``, ``clones``, ``status_stored``,
    ``clock_skew``), never read on an epoch: decoding ignores them."""

    #: The epoch's seqs (the legacy epoch ``""`` takes over ``NodeState.seqs``).
    seqs: SeqTracker = msgspec.field(default_factory=SeqTracker)
    #: Server (JetStream) times of the first and latest aggregate stored of this install.
    first_stored: datetime | None = None
    last_stored: datetime | None = None
    aggregates: int = 0
    #: Payload hash (hex) of the latest applied seqs, to tell a cloned device (same install
    #: and seq, other content) from a redelivery; bounded by ``RECENT_HASHES``.
    recent: dict[int, str] = {}


class NodeState(msgspec.Struct, kw_only=True):
    """What the cloud knows about one node (the fleet state of the issue)."""

    fleet: str
    node: str
    model: ModelRef | None = None
    device: DeviceProfile | None = None
    first_seen: datetime | None = None
    #: When the cloud last applied an aggregate or status of this node (its clock).
    last_seen: datetime | None = None
    last_window_end: datetime | None = None
    #: Exact sum of ``count`` over distinct aggregates.
    inferences: int = 0
    errors: int = 0
    #: Edge windows covered (an aggregate merged from several windows counts each).
    windows: int = 0
    aggregates: int = 0
    duplicates: int = 0
    late: int = 0
    #: Aggregates of a model the registry does not know (counted, not drift-tested).
    unregistered: int = 0
    #: Whether the model of the node's latest aggregate is in the registry (None: unknown).
    model_registered: bool | None = None
    #: The legacy tracker (one epoch per node): state written by the previous release has
    #: it filled; it moves into ``epochs[""]`` on first use (``Applier._epoch``).
    seqs: SeqTracker = msgspec.field(default_factory=SeqTracker)
    #: Seq epochs by install id ("" = nodes that send none), see ``InstallEpoch``.
    epochs: dict[str, InstallEpoch] = {}
    #: The install of the latest new epoch seen.
    install: str = ""
    #: Install pairs ("a/b") seen live at once on this node id: two devices, one id.
    conflicts: list[str] = []
    #: Aggregates that repeated an applied (install, seq) with other content.
    clones: int = 0
    #: Aggregates quarantined as seq jumps (``SeqTracker.jump``): dead-lettered, not counted.
    seq_jumps: int = 0
    #: Server time of the latest status report and the node's clock minus it (seconds; stored
    #: under its first name, ``clock_skew``).
    status_stored: datetime | None = None
    clock_skew_s: float | None = msgspec.field(default=None, name="clock_skew")
    #: Loss receipts carried by aggregates (outbox overflow at the edge).
    dropped_inferences: int = 0
    dropped_aggregates: int = 0
    # From the node's latest status message:
    status_time: datetime | None = None
    status_event: str | None = None
    outbox_depth: int = 0
    served: int = 0
    status_dropped_inferences: int = 0
    status_dropped_aggregates: int = 0
    last_error: str | None = None
    #: The last bundle the node refused because its runtime cannot run it (``incompatible``),
    #: until it installs one: "<model> v<version> <variant>: <reason>".
    cannot_run: str | None = None
    #: The signed key list version the node holds (0: none, or a node that does not say) and
    #: its pushed configuration (``NodeStatus.config_*``): the version in effect, the last one
    #: seen, what happened to it ("applied", "probation", "rejected", "rolled_back") and why.
    key_list_version: int = 0
    config_version: int | None = None
    config_seen: int | None = None
    config_state: str = ""
    config_reason: str | None = None


class StoredState(msgspec.Struct, kw_only=True):
    nodes: dict[tuple[str, str], NodeState]
    groups: list[Group]
    units: dict[tuple[str, str], NodeUnit]
    counters: dict[str, int]
    outbox: list[tuple[str, str, bytes]]


_enc = msgspec.msgpack.Encoder()
_node_dec = msgspec.msgpack.Decoder(NodeState)
_group_dec = msgspec.msgpack.Decoder(Group)
_unit_dec = msgspec.msgpack.Decoder(NodeUnit)
_round_dec = msgspec.msgpack.Decoder(RoundRecord)


def _iso(t: datetime | None) -> str | None:
    """UTC ISO text that sorts as time does (SQLite compares the text)."""
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _fleet_of(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


class StateStore:
    """``async with StateStore(path) as store:`` opens (creating) the database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

    async def __aenter__(self) -> Self:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(str(self.path), "open", str(exc)) from exc
        self._db = db
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            await self._close()
            raise StateError(str(self.path), "create schema", str(exc)) from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            # Shielded: the worker thread must finish before the loop may go away.
            with anyio.CancelScope(shield=True):
                await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StateError(str(self.path), "use", "the store is not open")
        return self._db

    async def load(self) -> StoredState:
        """Everything stored, for a service taking over (start or lease acquired)."""
        try:
            nodes = {}
            async with self.db.execute("SELECT data FROM nodes") as cur:
                for (data,) in await cur.fetchall():
                    n = _node_dec.decode(data)
                    nodes[(n.fleet, n.node)] = n
            async with self.db.execute("SELECT data FROM groups") as cur:
                groups = [_group_dec.decode(d) for (d,) in await cur.fetchall()]
            async with self.db.execute("SELECT grp, node, data FROM units") as cur:
                units = {(g, n): _unit_dec.decode(d) for g, n, d in await cur.fetchall()}
            async with self.db.execute("SELECT name, value FROM counters") as cur:
                counters = {name: int(v) for name, v in await cur.fetchall()}
            async with self.db.execute("SELECT id, subject, data FROM outbox ORDER BY rowid") as cur:
                outbox = [(i, s, bytes(d)) for i, s, d in await cur.fetchall()]
        except (sqlite3.Error, msgspec.DecodeError) as exc:
            raise StateError(str(self.path), "load", str(exc)) from exc
        return StoredState(nodes=nodes, groups=groups, units=units, counters=counters, outbox=outbox)

    async def commit(
        self,
        *,
        nodes: Sequence[NodeState] = (),
        groups: Sequence[Group] = (),
        units: Sequence[tuple[str, str, NodeUnit]] = (),
        counters: dict[str, int] | None = None,
        events: Sequence[tuple[str, str, bytes]] = (),
        rounds: Sequence[RoundRecord] = (),
    ) -> None:
        """Write one batch's changes atomically (all or nothing). Shielded from cancellation:
        a commit that started finishes (or rolls back) before the caller sees the cancel.
        ``events`` (id, subject, JSON) go to the outbox and the event log; ``rounds`` to the
        round history (pruned to ``HISTORY_ROUNDS`` per group)."""
        with anyio.CancelScope(shield=True):
            await self._commit(nodes, groups, units, counters, events, rounds)

    async def _history(self, rounds: Sequence[RoundRecord]) -> None:
        db = self.db
        try:
            await db.executemany(
                "INSERT OR REPLACE INTO rounds(grp, round, start, end_, data) VALUES (?,?,?,?,?)",
                [(r.group, r.round, _iso(r.start), _iso(r.end), _enc.encode(r)) for r in rounds],
            )
            newest: dict[str, int] = {}
            for r in rounds:
                newest[r.group] = max(newest.get(r.group, 0), r.round)
            await db.executemany(
                "DELETE FROM rounds WHERE grp=? AND round<?",
                [(g, n - HISTORY_ROUNDS) for g, n in newest.items()],
            )
        except sqlite3.Error as exc:
            raise StateError(str(self.path), "round history", str(exc)) from exc

    async def rounds(
        self, group: str, since: datetime | None = None, until: datetime | None = None, limit: int = 2000
    ) -> list[RoundRecord]:
        """The group's stored rounds whose windows lie in [since, until], oldest first (at
        most the newest ``limit``)."""
        sql = "SELECT data FROM rounds WHERE grp=?"
        args: list[Any] = [group]
        if since is not None:
            sql += " AND start>=?"
            args.append(_iso(since))
        if until is not None:
            sql += " AND end_<=?"
            args.append(_iso(until))
        sql += " ORDER BY round DESC LIMIT ?"
        args.append(limit)
        try:
            async with self.db.execute(sql, args) as cur:
                rows = await cur.fetchall()
            return [_round_dec.decode(d) for (d,) in reversed(list(rows))]
        except (sqlite3.Error, msgspec.DecodeError) as exc:
            raise StateError(str(self.path), "read rounds", str(exc)) from exc

    async def events(self, fleet: str | None = None, limit: int = 500) -> list[bytes]:
        """The newest logged drift events (JSON), oldest first."""
        sql = "SELECT data FROM events" + (" WHERE fleet=?" if fleet else "") + " ORDER BY time DESC LIMIT ?"
        args: list[Any] = [fleet, limit] if fleet else [limit]
        try:
            async with self.db.execute(sql, args) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise StateError(str(self.path), "read events", str(exc)) from exc
        return [bytes(d) for (d,) in reversed(list(rows))]

    async def _commit(
        self,
        nodes: Sequence[NodeState],
        groups: Sequence[Group],
        units: Sequence[tuple[str, str, NodeUnit]],
        counters: dict[str, int] | None,
        events: Sequence[tuple[str, str, bytes]],
        rounds: Sequence[RoundRecord] = (),
    ) -> None:
        db = self.db
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                if nodes:
                    await db.executemany(
                        "INSERT OR REPLACE INTO nodes(fleet, node, data) VALUES (?,?,?)",
                        [(n.fleet, n.node, _enc.encode(n)) for n in nodes],
                    )
                if groups:
                    await db.executemany(
                        "INSERT OR REPLACE INTO groups(key, data) VALUES (?,?)",
                        [(g.key, _enc.encode(g)) for g in groups],
                    )
                if units:
                    await db.executemany(
                        "INSERT OR REPLACE INTO units(grp, node, data) VALUES (?,?,?)",
                        [(g, n, _enc.encode(u)) for g, n, u in units],
                    )
                if counters:
                    await db.executemany(
                        "INSERT OR REPLACE INTO counters(name, value) VALUES (?,?)", list(counters.items())
                    )
                if events:
                    await db.executemany(
                        "INSERT OR IGNORE INTO outbox(id, subject, data) VALUES (?,?,?)", events
                    )
                    await db.executemany(
                        "INSERT OR IGNORE INTO events(id, fleet, time, data) VALUES (?,?,?,?)",
                        [(i, _fleet_of(subject), _now_iso(), d) for i, subject, d in events],
                    )
                if rounds:
                    await self._history(rounds)
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateError(str(self.path), "commit", str(exc)) from exc

    async def outbox_done(self, ids: list[str]) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self.db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
        except sqlite3.Error as exc:
            raise StateError(str(self.path), "outbox delete", str(exc)) from exc

    async def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read-only helper for tests and tools."""
        try:
            async with self.db.execute(sql, args) as cur:
                return [tuple(r) for r in await cur.fetchall()]
        except sqlite3.Error as exc:
            raise StateError(str(self.path), "query", str(exc)) from exc
