"""The node's SQLite store: privacy-filtered event rows, the outbox of numbered aggregates,
the models served, node state and the DP ledger (docs/architecture.md §5–6).

One connection, one writer: every transaction runs under ``self._lock`` with explicit
``BEGIN IMMEDIATE``/``COMMIT``, so the group-commit writer, the window closer and the outbox
publisher never interleave statements. WAL with ``synchronous=NORMAL``: a commit is in the
WAL file (the OS has it) when ``COMMIT`` returns, which survives ``kill -9`` of the process
(not a power cut; that would need ``synchronous=FULL``).

Durability contract: an ``append``'s ``Commit`` is done once its rows are committed — or, when
the disk fails (full, I/O errors), once they are counted in the durable loss receipt
(``edge.receipt``; ``Commit.stored`` is then False and the buffer is ``degraded``). A degraded
buffer stops trying SQLite for every group and probes it every ``_PROBE_INTERVAL`` seconds;
the first probe that stores ends the spell. Nothing a failing disk does stops the writer.
A database that cannot even be opened at start on a full or failing disk is the same spell:
the node serves degraded (models get provisional negative ids; losses go to the receipt,
which on a disk that never had room for it counts in its length, see ``edge.receipt``, so
they outlive a restart during the spell; only what even that cannot take is
``unrecorded_events``, in memory), and the probe that opens it stores those ids and moves
those losses into the receipt of the new install.
The receipt reaches the cloud in ``dropped_inferences`` of the next aggregate, moved in the
same transaction that records how much was moved (``receipt_reported``). A window close
builds its aggregates, gives each the next ``seq``, inserts them into the outbox and deletes
their events in ONE transaction, so a crash leaves either the events or the aggregate, never
both or neither. ``next_seq`` lives in the same database and survives restarts.
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import aiosqlite
import anyio
import msgspec
import numpy as np
import structlog

from slmops.edge._sqlite import SCHEMA, Transaction
from slmops.edge.errors import NodeClosed, StoreError
from slmops.edge.ledger import PrivacyLedger
from slmops.edge.privacy import EventRow, add_noise, suppress
from slmops.edge.receipt import LossReceipt
from slmops.edge.window import ModelInfo, build_aggregate, compact
from slmops.shared.messages import (
    EmbeddingStats,
    GenerationSpec,
    HistogramEdges,
    ModelRef,
    TelemetryAggregate,
    decode_telemetry,
    encode_telemetry,
)

__all__ = ["Buffer", "BufferStats", "Commit"]

log = structlog.get_logger(__name__)

#: One statement inserts a whole group from a JSON array of rows. In autocommit mode one
#: statement is one atomic transaction, so a group commit is ONE trip to the aiosqlite thread
#: instead of three (BEGIN, executemany, COMMIT); a trip costs ~130 µs on the 2-core test
#: machine, the insert itself ~2 µs/row (measured: 457k rows/s in 4096-row groups).
_INSERT_EVENTS = (
    "INSERT INTO events(t, model, label, conf, len, lat, err, oos) SELECT "
    "value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7 "
    "FROM json_each(?)"
)
_rows_encoder = msgspec.json.Encoder()
#: Rows one group commit takes at most (measured: 4096 rows commit in ~6 ms here).
_GROUP_ROWS = 4096
_STATE_KEYS = (
    "next_seq",
    "carry_inferences",
    "carry_aggregates",
    "dropped_inferences",
    "dropped_aggregates",
    "merges",
    "sent",
    "last_sync",
    "receipt_reported",
)
#: WAL with ``synchronous=NORMAL`` (see the module docstring). The WAL is checkpointed every
#: 256 pages (1 MiB, SQLite's default is 4 MiB) and cut back to 1 MiB after a checkpoint, so
#: on a small disk it does not hold 4 MiB for good after a burst (a 4 MiB tmpfs filled with
#: the WAL alone).
_PRAGMAS = (
    "journal_mode=WAL",
    "synchronous=NORMAL",
    "busy_timeout=5000",
    "wal_autocheckpoint=256",
    f"journal_size_limit={1 << 20}",
)
#: Disk space the outbox bound leaves to the WAL: it grows to ~1 MiB between checkpoints
#: (measured 1.15 MiB on a 4 MiB tmpfs) before being cut back.
_WAL_RESERVE = 1536 * 1024
#: Seconds between attempts to store again while the disk fails.
_PROBE_INTERVAL = 1.0
_info_decoder = msgspec.json.Decoder(ModelInfo)


class _Corrupt(Exception):
    """The database opened but fails its integrity check."""


#: SQLite primary result codes of a file that is not (or no longer) a readable database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _corrupt(exc: BaseException) -> bool:
    if isinstance(exc, _Corrupt | msgspec.DecodeError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


#: SQLite result codes (primary) of a disk that is full or failing, not of a bad path.
_SQLITE_IOERR, _SQLITE_FULL = 10, 13


def _disk_failing(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full or failing (ENOSPC, EDQUOT, EIO, SQLite's FULL
    or IOERR): then the node serves on degraded; any other error opening is a setup error."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_IOERR, _SQLITE_FULL)


class Commit:
    """Completion of one ``append``: ``done`` is set once the rows are committed (``stored``)
    or could not be (``error`` says why; they are then counted in the loss receipt unless
    even that failed, see ``receipted``)."""

    __slots__ = ("done", "error", "receipted", "rows")

    def __init__(self, rows: Sequence[EventRow]) -> None:
        self.rows = rows
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.receipted = False

    @property
    def stored(self) -> bool:
        """Whether the rows are in SQLite (meaningful once ``done`` is set)."""
        return self.done.is_set() and self.error is None


class BufferStats(msgspec.Struct, kw_only=True, frozen=True):
    """A snapshot of ``EventBuffer.statistics()`` (a frozen Struct: it is also encoded)."""

    outbox_depth: int
    outbox_bytes: int
    file_bytes: int
    next_seq: int
    dropped_inferences: int
    dropped_aggregates: int
    merges: int
    sent: int
    last_sync: float | None
    committed_events: int
    #: Events stored and not yet in an aggregate (waiting for their window, or for k).
    pending_events: int
    #: Event rows not stored since start (disk failures), and how many of them the loss
    #: receipt could not count either (the receipt file itself failing).
    lost_events: int
    unrecorded_events: int = 0
    #: The durable loss receipt: inferences not stored, cumulative for this install, and how
    #: many of them are already in an aggregate.
    receipt_lost: int = 0
    receipt_reported: int = 0
    #: Why storage is degraded (None while SQLite takes rows).
    degraded: str | None = None


class Buffer:
    """The SQLite buffer of one node. ``async with Buffer(...) as buf:`` opens (creating the
    schema), then run ``buf.run_writer()`` in a task for ``append`` to complete."""

    def __init__(
        self,
        path: Path,
        *,
        fleet: str,
        node: str,
        k: int,
        window: float,
        outbox_max_bytes: int,
        dp_epsilon: float | None = None,
        dp_budget: float | None = None,
        queue: int = 1024,
        commit_interval: float = 0.0,
        clock: Callable[[], float],
        rng: np.random.Generator | None = None,
        ledger: PrivacyLedger | None = None,
    ) -> None:
        self.path = Path(path)
        #: Epsilon spent over every install of this node (``edge.ledger``); None: only this
        #: database's own table counts.
        self.ledger = ledger
        self.fleet, self.node, self.k, self.window = fleet, node, k, window
        self.outbox_max_bytes = outbox_max_bytes
        self.dp_epsilon, self.dp_budget = dp_epsilon, dp_budget
        self._clock = clock
        self.commit_interval = commit_interval
        self._rng = rng if rng is not None else np.random.default_rng()
        self._db: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()
        # Bounded: when the disk lags, inference waits here (backpressure) rather than
        # queueing rows without limit or answering apps for rows that may never be stored.
        self._send, self._recv = anyio.create_memory_object_stream[Commit](queue)
        self._models: dict[int, ModelInfo] = {}
        #: The model now serving (set by the node); others' leftovers below k are flushed.
        self.current_model_id: int | None = None
        #: Ids of every model the node serves (several side by side); a model not among
        #: them (nor ``current_model_id``) is retired: its leftovers below k are flushed.
        self.live_model_ids: set[int] = set()
        self._state: dict[str, float] = dict.fromkeys(_STATE_KEYS, 0)
        #: While a transaction runs: the state it began from, which ``statistics()`` shows
        #: until the commit (see ``_tx``).
        self._shown: dict[str, float] | None = None
        self._outbox_depth = self._outbox_bytes = 0
        self._committed = self._lost = self._pending = self._unrecorded = 0
        self.receipt = LossReceipt(self.path.with_name("loss_receipt.bin"))
        #: Why storage is degraded, None while SQLite takes rows; see the module docstring.
        self.degraded: str | None = None
        self._next_probe = 0.0
        #: The database could not be opened at start (a full disk): ``_probe`` retries.
        self._unopened = False
        self.outbox_changed = anyio.Event()
        #: This data directory's install id (see ``_load_install``); "" for a legacy database.
        self.install = ""
        #: File names of quarantined databases beside ``path`` (see ``__aenter__``).
        self.quarantined: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open (creating the schema). An unreadable database — not SQLite, truncated,
        failing its ``quick_check`` — is quarantined: renamed (with its -wal/-shm) to
        ``<name>.quarantined-<UTC time>`` and replaced by a fresh one, which is a new install
        (listed in ``quarantined``). Raises ``StoreError`` for anything else (e.g. a
        directory the node may not write)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._open_or_quarantine()
        except (sqlite3.Error, OSError) as exc:
            await self._close_db()
            self.receipt.close()
            if not _disk_failing(exc):
                self._send.close()
                self._recv.close()
                raise StoreError(str(self.path), f"cannot open: {exc}") from exc
            # A start on a full (or failing) disk: serve on, degraded, as when the disk
            # fills while running; the writer's probe opens the database once it can.
            self._unopened = True
            self._degrade(StoreError(str(self.path), f"cannot open: {exc}"))
            self._open_early_receipt()
        self.quarantined = sorted(
            p.name
            for p in self.path.parent.glob(f"{self.path.name}.quarantined-*")
            if not p.name.endswith(("-wal", "-shm"))
        )
        log.info(
            "buffer_opened",
            path=str(self.path),
            install=self.install,
            next_seq=int(self._state["next_seq"]),
            outbox=self._outbox_depth,
        )
        return self

    async def _open_or_quarantine(self) -> None:
        try:
            await self._open()
        except (sqlite3.DatabaseError, msgspec.DecodeError, _Corrupt) as exc:
            if not _corrupt(exc):
                raise
            await self._close_db()
            self.receipt.close()
            self._state = dict.fromkeys(_STATE_KEYS, 0)
            self._models = {k: v for k, v in self._models.items() if k < 0}
            self._quarantine(exc)
            await self._open()

    async def _open_late(self) -> bool:
        """Open a database that could not be opened at start (see ``__aenter__``): models
        registered meanwhile keep their provisional (negative) ids, and losses no receipt
        could count meanwhile go into the receipt now, so they reach the cloud. Returns
        whether it opened; else the buffer stays degraded."""
        try:
            await self._open_or_quarantine()
            async with self._tx():
                await self.db.executemany(
                    "INSERT OR IGNORE INTO models(id, key, info) VALUES (?, ?, ?)",
                    [
                        (mid, f"{i.ref.name}/{i.ref.version}/{i.ref.variant}", msgspec.json.encode(i))
                        for mid, i in self._models.items()
                        if mid < 0
                    ],
                )
            self.receipt.add(self._unrecorded)
        except (sqlite3.Error, OSError, StoreError) as exc:
            await self._close_db()
            self.receipt.close()
            self._degrade(StoreError(str(self.path), f"cannot open: {exc}"))
            self._open_early_receipt()
            return False
        log.warning("buffer_opened_late", install=self.install, receipted=self._unrecorded)
        self._unrecorded = 0
        self._unopened = False
        return True

    def _open_early_receipt(self) -> None:
        """While the database cannot open, count losses in the receipt anyway (its reserved
        slots, or its length on a disk that never had room for them: ``LossReceipt.open_early``),
        so they outlive a restart during the spell; else only in memory (``unrecorded_events``)."""
        try:
            self.receipt.open_early()
        except OSError as exc:
            log.error("loss_receipt_failed", error=repr(exc), note="losses counted in memory only")

    def _quarantine(self, why: BaseException) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                dst = src.with_name(f"{self.path.name}.quarantined-{stamp}{suffix}")
                src.rename(dst)
                moved.append(dst.name)
        log.error(
            "database_quarantined",
            path=str(self.path),
            error=str(why),
            moved=moved,
            note="serving on with a fresh database (a new install)",
        )

    async def _open(self) -> None:
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in _PRAGMAS:
            await self._db.execute(f"PRAGMA {pragma}")
        async with self._db.execute("PRAGMA quick_check") as cur:
            check = [str(r[0]) for r in await cur.fetchall()]
        if check != ["ok"]:
            raise _Corrupt("; ".join(check[:3]))
        await self._db.executescript(SCHEMA)
        async with self._db.execute("SELECT name FROM pragma_table_info('events')") as cur:
            columns = {str(r[0]) for r in await cur.fetchall()}
        if "oos" not in columns:  # a database made before out-of-scope counts
            await self._db.execute("ALTER TABLE events ADD COLUMN oos INTEGER NOT NULL DEFAULT 0")
        async with self._db.execute("SELECT key, value FROM node_state") as cur:
            for key, value in await cur.fetchall():
                self._state[key] = value
        fresh = not self._state["next_seq"]
        if fresh:
            self._state["next_seq"] = 1
        self.install = await self._load_install(fresh)
        self.receipt.open(self.install, floor=int(self._state["receipt_reported"]))
        if self.ledger is not None:
            await self._carry_ledger()
        async with self._db.execute("SELECT id, info FROM models") as cur:
            for mid, info in await cur.fetchall():
                self._models[mid] = msgspec.structs.replace(_info_decoder.decode(info), model_id=mid)
        await self._refresh_outbox_stats()
        self._pending = await self.pending_events()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            self._send.close()
            await self._drain()
            self._recv.close()
            await self._close_db()
            self.receipt.close()

    async def _carry_ledger(self) -> None:
        """Copy into the install-independent ledger what this database spent before it
        existed (a node upgraded from a release without it), once."""
        assert self.ledger is not None
        async with self.db.execute("SELECT coalesce(sum(epsilon), 0) FROM dp_ledger") as cur:
            row = await cur.fetchone()
        here = float(row[0]) if row else 0.0
        async with self.db.execute("SELECT value FROM node_meta WHERE key='ledger_carried'") as cur:
            done = await cur.fetchone()
        if done is not None or here <= 0:
            if done is None:
                await self.db.execute("INSERT INTO node_meta(key, value) VALUES ('ledger_carried', '1')")
            return
        await self.ledger.carry(self.install, here)
        await self.db.execute("INSERT INTO node_meta(key, value) VALUES ('ledger_carried', '1')")

    async def _load_install(self, fresh: bool) -> str:
        """The install id stored beside ``seq`` (table ``node_meta``), made on first open: a
        new database (no ``next_seq`` yet, nothing stored) gets a random uuid4 hex, so its
        ``seq`` 1 is a new epoch; a database of an older release (``seq`` already running)
        keeps the legacy epoch "" so its numbering stays one sequence."""
        async with self.db.execute("SELECT value FROM node_meta WHERE key='install'") as cur:
            row = await cur.fetchone()
        if row is not None:
            return str(row[0])
        if fresh:
            async with self.db.execute(
                "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM events)"
            ) as cur:
                stored = await cur.fetchone()
            fresh = not (stored and stored[0])
        install = uuid.uuid4().hex if fresh else ""
        await self.db.execute("INSERT INTO node_meta(key, value) VALUES ('install', ?); ", (install,))
        if fresh:  # next_seq is stored with the id: a reopened database is never "fresh" again
            await self.db.execute("INSERT OR IGNORE INTO node_state(key, value) VALUES ('next_seq', 1)")
        log.info("install_id", install=install or "(legacy)", new=fresh)
        return install

    def discard(self) -> None:
        """Release the commit queue of a buffer that was never opened (idempotent)."""
        self._send.close()
        self._recv.close()

    async def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                await db.close()
            except sqlite3.Error as exc:
                log.warning("buffer_close_failed", error=repr(exc))

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection. Raises ``StoreError`` while the database could not be opened
        yet (a start on a full disk), ``NodeClosed`` once closed."""
        if self._db is None:
            if self._unopened:
                raise StoreError(str(self.path), self.degraded or "not open yet")
            raise NodeClosed("telemetry buffer")
        return self._db

    # -- models -----------------------------------------------------------------------------

    async def register_model(
        self,
        ref: ModelRef,
        labels: list[str],
        edges: HistogramEdges,
        embedding: EmbeddingStats | None = None,
        *,
        out_of_scope: bool = False,
        generation: GenerationSpec | None = None,
    ) -> ModelInfo:
        """The id under which events of this model are stored (created on first use);
        ``out_of_scope``: its aggregates carry out-of-scope counts; ``generation``: a
        generation model's spec (its extra histogram edges and refusal categories)."""
        key = f"{ref.name}/{ref.version}/{ref.variant}"
        for info in self._models.values():
            if info.ref == ref:
                return info
        info = ModelInfo(
            model_id=0,
            ref=ref,
            labels=labels,
            edges=edges,
            embedding=embedding,
            out_of_scope=out_of_scope,
            generation=generation.edges if generation is not None else None,
            refusals=list(generation.refusals) if generation is not None else [],
        )
        if self._db is None and self._unopened:  # stored with this id once the db opens
            info = msgspec.structs.replace(info, model_id=min([0, *self._models]) - 1)
            self._models[info.model_id] = info
            return info
        async with self._tx():
            cur = await self.db.execute(  # ids > 0 also after provisional (negative) ones
                "INSERT INTO models(id, key, info) VALUES "
                "((SELECT max(1, coalesce(max(id), 0) + 1) FROM models), ?, ?)",
                (key, msgspec.json.encode(info)),
            )
            mid = cur.lastrowid
        assert mid is not None
        info = msgspec.structs.replace(info, model_id=mid)
        self._models[mid] = info
        return info

    # -- events -----------------------------------------------------------------------------

    async def append(self, rows: Sequence[EventRow]) -> Commit:
        """Queue ``rows`` for the next group commit; returns at once with a ``Commit`` whose
        ``done`` is set once they are durable (waits only when the queue is full)."""
        commit = Commit(rows)
        try:
            await self._send.send(commit)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise NodeClosed("telemetry buffer") from exc
        return commit

    async def run_writer(self) -> None:
        """Group commit: take every queued ``append`` (up to ``_GROUP_ROWS`` rows), insert
        them with one statement (one atomic commit), then release their waiters. Never
        raises for a failing disk (see the module docstring); while degraded and idle it
        probes the disk every ``_PROBE_INTERVAL`` seconds, so the spell ends without traffic."""
        while True:
            try:
                if self.degraded is None:
                    first = await self._recv.receive()
                else:
                    with anyio.move_on_after(_PROBE_INTERVAL) as idle:
                        first = await self._recv.receive()
                    if idle.cancelled_caught:
                        await self._probe()
                        continue
            except anyio.EndOfStream:
                return
            started = time.monotonic()
            await self._commit_group(self._gather(first))
            if self.commit_interval > 0:
                # Fewer, larger commits: each trip to the SQLite thread also fights the
                # event loop for the GIL (see EdgeConfig.commit_interval).
                await anyio.sleep(max(0.0, self.commit_interval - (time.monotonic() - started)))

    def _gather(self, first: Commit) -> list[Commit]:
        group, n = [first], len(first.rows)
        while n < _GROUP_ROWS:
            try:
                item = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            group.append(item)
            n += len(item.rows)
        return group

    async def _commit_group(self, group: list[Commit]) -> None:
        rows = [r for c in group for r in c.rows]
        if self._unopened and time.monotonic() >= self._next_probe:
            await self._probe()
        if self.degraded is not None and time.monotonic() < self._next_probe:
            self._fail(group, len(rows), StoreError(str(self.path), self.degraded))
            return
        try:
            async with self._lock:  # no explicit transaction may be open around ours
                await self.db.execute(_INSERT_EVENTS, (_rows_encoder.encode(rows),))
        except (sqlite3.Error, StoreError, NodeClosed) as exc:
            error = exc if isinstance(exc, StoreError | NodeClosed) else self._store_error(exc)
            self._degrade(error)
            self._fail(group, len(rows), error)
            return
        self._recovered()
        self._committed += len(rows)
        self._pending += len(rows)
        for c in group:
            c.done.set()

    def _store_error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(str(self.path), f"cannot store events: {exc}")

    def _degrade(self, error: BaseException) -> None:
        if self.degraded is None:
            log.error("storage_degraded", error=str(error), note="answering on; losses go to the receipt")
        self.degraded = str(error)
        self._next_probe = time.monotonic() + _PROBE_INTERVAL

    def _recovered(self) -> None:
        if self.degraded is not None:
            log.warning("storage_resumed", receipt_lost=self.receipt.lost)
            self.degraded = None

    async def _probe(self) -> None:
        """One small write: does the disk take rows again? (Or: does the database open now?)"""
        if self._unopened:
            if await self._open_late():
                self._recovered()
            return
        try:
            async with self._lock:
                await self.db.execute(
                    "INSERT OR REPLACE INTO node_meta(key, value) VALUES ('probe', ?)", (str(self._clock()),)
                )
        except (sqlite3.Error, NodeClosed) as exc:
            self._degrade(exc if isinstance(exc, NodeClosed) else self._store_error(exc))
            return
        self._recovered()

    def _fail(self, group: list[Commit], n: int, exc: BaseException) -> None:
        """Rows not stored: count them in the durable receipt, then release their waiters."""
        self._lost += n
        receipted = True
        try:
            self.receipt.add(n)
        except OSError as rexc:
            receipted = False
            self._unrecorded += n
            log.error("loss_receipt_failed", rows=n, error=repr(rexc))
        log.debug("events_not_stored", rows=n, error=str(exc), receipted=receipted)
        for c in group:
            c.error = exc
            c.receipted = receipted
            c.done.set()

    async def _drain(self) -> None:
        """Commit what is still queued (shutdown path)."""
        while True:
            try:
                first = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            if self._db is None:
                return
            await self._commit_group(self._gather(first))

    async def add_feedback(self, model_id: int, true_label: str, pred_label: str) -> None:
        """Store one ground-truth pair (labels only) for the next window of ``model_id``."""
        async with self._tx():
            await self.db.execute(
                "INSERT INTO feedback(t, model, true_label, pred_label) VALUES (?,?,?,?)",
                (self._clock(), model_id, true_label, pred_label),
            )

    # -- windows ----------------------------------------------------------------------------

    async def close_window(self, now: float) -> int:
        """Turn the stored events of each model into one numbered aggregate in the outbox, in
        one transaction; a model with fewer than ``k`` events keeps them for the next window
        (k-anonymity) while it is current and had an event in the last two windows, else they
        go out as counts only (``privacy.suppress``). The first aggregate also carries the
        loss receipts not yet reported (inferences not stored on a failing disk, and what
        compaction could not put into a survivor); with none made, a count-0 aggregate of
        the current model carries them. Compacts the outbox if it outgrew its bound. Returns
        aggregates made.
        Raises ``StoreError`` when the database cannot take the window (it stays open)."""
        made = closed = 0
        async with self._tx():
            db = self.db
            receipt_lost = self.receipt.lost
            async with db.execute(
                "SELECT model, count(*), min(t), max(id), max(t) FROM events GROUP BY model"
            ) as cur:
                groups = await cur.fetchall()
            for mid, n, t0, max_id, t1 in groups:
                info = self._models.get(mid)
                if info is None:
                    continue
                # Fewer than k events wait for company (k-anonymity of the distribution),
                # but not forever: a version no longer serving (the node left it: swap,
                # cloud rollback, safety rollback) gets none, and neither does one that has
                # been quiet for two windows (an idle node, or one about to stop). Those go
                # out as counts only (exact count and errors, no class or histogram cell,
                # privacy "suppressed"), so every inference is counted without publishing
                # a small window's mix. Old code waited two quiet windows for a retired
                # version too, and a node stopped within them never published its last
                # events; an idle node's current version never did (issue 15).
                # Several models may serve side by side: each of them is live.
                served = set(self.live_model_ids)
                if self.current_model_id is not None:
                    served.add(self.current_model_id)
                retired = bool(served) and mid not in served
                if n < self.k and not retired and t1 >= now - 2 * self.window:
                    continue
                async with db.execute(
                    "SELECT label, conf, len, lat, err, count(*), oos FROM events WHERE model=? "
                    "AND id<=? GROUP BY label, conf, len, lat, err, oos",
                    (mid, max_id),
                ) as cur:
                    cells = await cur.fetchall()
                async with db.execute(
                    "SELECT true_label, pred_label, count(*), max(id) FROM feedback WHERE model=? "
                    "GROUP BY true_label, pred_label",
                    (mid,),
                ) as cur:
                    fb = await cur.fetchall()
                seq = int(self._state["next_seq"])
                agg = build_aggregate(
                    fleet=self.fleet,
                    node=self.node,
                    info=info,
                    seq=seq,
                    start=math.floor(t0 / self.window) * self.window,
                    end=now,
                    cells=cells,  # type: ignore[arg-type]  # sqlite rows are tuples of int
                    feedback=[(a, b, c) for a, b, c, _ in fb],
                    k=self.k,
                    install=self.install,
                )
                agg = suppress(agg) if n < self.k else await self._privatize(agg, info, now)
                await self._insert_outbox([self._with_receipts(agg, receipt_lost)])
                await db.execute("DELETE FROM events WHERE model=? AND id<=?", (mid, max_id))
                closed += n
                if fb:
                    await db.execute(
                        "DELETE FROM feedback WHERE model=? AND id<=?", (mid, max(r[3] for r in fb))
                    )
                self._state["next_seq"] = seq + 1
                made += 1
            info = self._models.get(self.current_model_id) if self.current_model_id is not None else None
            owed = receipt_lost > self._state["receipt_reported"] or self._state["carry_inferences"] > 0
            if not made and owed and info is not None:
                seq = int(self._state["next_seq"])
                agg = build_aggregate(
                    fleet=self.fleet, node=self.node, info=info, seq=seq, start=now, end=now,
                    cells=[], k=self.k, install=self.install,
                )  # fmt: skip
                await self._insert_outbox([self._with_receipts(suppress(agg), receipt_lost)])
                self._state["next_seq"] = seq + 1
                made += 1
            outbox = self._outbox_depth, self._outbox_bytes
            if made:
                await self._enforce_bound()
                await self._save_state()
                outbox = await self._outbox_stats()  # as this transaction will commit it
        # One step with the commit, no await in between: a ``statistics()`` read (health)
        # never sees these events gone from ``pending_events`` and not yet in the outbox
        # (chaos seed 11: a drained-looking twin was stopped with one aggregate unsent).
        self._pending -= closed
        if made:
            self._outbox_depth, self._outbox_bytes = outbox
            self._notify()
        return made

    def _with_receipts(self, agg: TelemetryAggregate, receipt_lost: int) -> TelemetryAggregate:
        """``agg`` carrying every receipt not reported yet; marks them reported (in memory:
        the caller's transaction saves or rolls back the state with the aggregate)."""
        s = self._state
        unreported = max(0, receipt_lost - int(s["receipt_reported"]))
        agg = msgspec.structs.replace(
            agg,
            dropped_inferences=agg.dropped_inferences + int(s["carry_inferences"]) + unreported,
            dropped_aggregates=agg.dropped_aggregates + int(s["carry_aggregates"]),
        )
        s["carry_inferences"] = s["carry_aggregates"] = 0
        s["receipt_reported"] = max(receipt_lost, int(s["receipt_reported"]))
        return agg

    async def _privatize(self, agg: TelemetryAggregate, info: ModelInfo, now: float) -> TelemetryAggregate:
        eps = self.dp_epsilon
        if eps is None:
            return agg
        spent = await self.dp_spent()
        if self.dp_budget is not None and spent + eps > self.dp_budget + 1e-12:
            log.warning("dp_budget_spent", spent=spent, budget=self.dp_budget, seq=agg.seq)
            return suppress(agg)
        if self.ledger is not None:
            # Before the aggregate commits: a crash in between over-counts, never under.
            await self.ledger.spend(self.install, agg.seq, eps)
        await self.db.execute("INSERT INTO dp_ledger(seq, epsilon, t) VALUES (?,?,?)", (agg.seq, eps, now))
        return add_noise(agg, eps, self._rng, info.labels)

    async def dp_spent(self) -> float:
        """Epsilon spent by this node: this database's ledger, or the install-independent
        ``ledger`` (``edge.ledger``) when that says more (an earlier install spent it)."""
        async with self.db.execute("SELECT coalesce(sum(epsilon), 0) FROM dp_ledger") as cur:
            row = await cur.fetchone()
        here = float(row[0]) if row else 0.0
        if self.ledger is None:
            return here
        try:
            return max(here, await self.ledger.spent())
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(str(self.ledger.path), f"privacy ledger unreadable: {exc}") from exc

    async def _insert_outbox(self, aggs: Sequence[TelemetryAggregate]) -> None:
        rows = []
        for a in aggs:
            payload = encode_telemetry(a)
            rows.append((a.seq, len(payload), a.count, payload))
        await self.db.executemany("INSERT INTO outbox(seq, bytes, count, payload) VALUES (?,?,?,?)", rows)

    def outbox_bound(self, outbox_bytes: int) -> int:
        """The outbox's byte bound now: ``outbox_max_bytes``, and at most half of what the
        outbox plus the free disk space could hold once ``_WAL_RESERVE`` is kept for the WAL,
        so a small or shared disk keeps as much room free as the outbox takes (for a
        compaction's transaction and the rest of the device)."""
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return self.outbox_max_bytes
        try:
            wal = Path(f"{self.path}-wal").stat().st_size  # already taken from the disk
        except OSError:
            wal = 0
        room = outbox_bytes + free - max(0, _WAL_RESERVE - wal)
        return min(self.outbox_max_bytes, max(0, room) // 2)

    async def _enforce_bound(self) -> None:
        """docs/architecture.md §5: merge never-attempted aggregates until the outbox fits
        ``outbox_bound``; drop the oldest (with a receipt) only while it is over the
        configured ``outbox_max_bytes`` (a long outage), never because the disk is full:
        an aggregate in the outbox is stored, its space already taken, and issue 13 (fault 4)
        asks for losses only where storing failed. A CI run dropped 30 stored inferences
        into receipts when a window closed on a nearly full disk (bound 0)."""
        db = self.db
        async with db.execute("SELECT coalesce(sum(bytes), 0) FROM outbox") as cur:
            row = await cur.fetchone()
        bound = self.outbox_bound(int(row[0]) if row else 0)
        if row is None or row[0] <= bound:
            return
        async with db.execute("SELECT coalesce(sum(bytes), 0) FROM outbox WHERE attempted=1") as cur:
            sent_row = await cur.fetchone()
        attempted_bytes = int(sent_row[0]) if sent_row else 0
        async with db.execute("SELECT payload FROM outbox WHERE attempted=0 ORDER BY seq") as cur:
            pending = [decode_telemetry(p) for (p,) in await cur.fetchall()]
        if not pending:
            return
        result = compact(
            pending,
            max(0, bound - attempted_bytes),
            drop_budget=max(0, self.outbox_max_bytes - attempted_bytes),
        )
        await db.execute("DELETE FROM outbox WHERE attempted=0")
        await self._insert_outbox(result.aggregates)
        self._state["next_seq"] = pending[0].seq + len(result.aggregates)
        self._state["carry_inferences"] += result.carry_inferences
        self._state["carry_aggregates"] += result.carry_aggregates
        self._state["dropped_inferences"] += result.dropped_inferences
        self._state["dropped_aggregates"] += result.dropped_aggregates
        self._state["merges"] += result.merges
        log.warning(
            "outbox_compacted",
            before=len(pending),
            after=len(result.aggregates),
            merges=result.merges,
            dropped_aggregates=result.dropped_aggregates,
            dropped_inferences=result.dropped_inferences,
        )

    # -- outbox -----------------------------------------------------------------------------

    async def outbox_take(self, limit: int) -> list[tuple[int, bytes]]:
        """The oldest ``limit`` aggregates ``(seq, payload)`` in ``seq`` order, marked
        attempted (committed) before the caller may publish them: from then on they are
        never merged or renumbered, so a ghost write's ``Nats-Msg-Id`` stays true."""
        async with self._tx():
            async with self.db.execute(
                "SELECT seq, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ) as cur:
                rows = [(int(s), bytes(p)) for s, p in await cur.fetchall()]
            if rows:
                await self.db.execute(
                    "UPDATE outbox SET attempted=1 WHERE seq<=? AND attempted=0", (rows[-1][0],)
                )
        return rows

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        """Delete acknowledged aggregates (after their PubAck)."""
        if not seqs:
            return
        async with self._tx():
            await self.db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])
            self._state["sent"] += len(seqs)
            self._state["last_sync"] = self._clock()
            await self._save_state()
            outbox = await self._outbox_stats()
        # Read under the lock: a refresh after it could land after a later close's.
        self._outbox_depth, self._outbox_bytes = outbox

    # -- state ------------------------------------------------------------------------------

    async def _save_state(self) -> None:
        await self.db.executemany(
            "INSERT INTO node_state(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            list(self._state.items()),
        )

    async def _outbox_stats(self) -> tuple[int, int]:
        """``(depth, bytes)`` of the outbox as this connection sees it (inside a transaction:
        what its commit will leave)."""
        async with self.db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM outbox") as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def _refresh_outbox_stats(self) -> None:
        self._outbox_depth, self._outbox_bytes = await self._outbox_stats()

    def _notify(self) -> None:
        event, self.outbox_changed = self.outbox_changed, anyio.Event()
        event.set()

    async def pending_events(self) -> int:
        async with self.db.execute("SELECT count(*) FROM events") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def outbox_counts(self) -> list[tuple[int, int]]:
        """``(seq, count)`` of every aggregate in the outbox (for tests and operators)."""
        async with self.db.execute("SELECT seq, count FROM outbox ORDER BY seq") as cur:
            return [(int(s), int(c)) for s, c in await cur.fetchall()]

    def statistics(self) -> BufferStats:
        size = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):  # -wal/-shm exist only while open
                size += Path(f"{self.path}{suffix}").stat().st_size
        s = self._shown if self._shown is not None else self._state
        return BufferStats(
            outbox_depth=self._outbox_depth,
            outbox_bytes=self._outbox_bytes,
            file_bytes=size,
            next_seq=int(s["next_seq"]),
            dropped_inferences=int(s["dropped_inferences"]),
            dropped_aggregates=int(s["dropped_aggregates"]),
            merges=int(s["merges"]),
            sent=int(s["sent"]),
            last_sync=float(s["last_sync"]) or None,
            committed_events=self._committed,
            pending_events=self._pending,
            lost_events=self._lost,
            unrecorded_events=self._unrecorded,
            receipt_lost=self.receipt.lost,
            receipt_reported=int(s["receipt_reported"]),
            degraded=self.degraded,
        )

    # -- transactions -----------------------------------------------------------------------

    def _tx(self) -> Transaction:
        """A transaction whose changes to the in-memory state follow its outcome: a rollback
        restores the state it began from, and ``statistics()`` shows that state until the
        commit (a health read inside a window close never sees its receipts reported before
        the aggregate carrying them is stored)."""
        saved: dict[str, float] = {}

        def save() -> None:  # under the lock: no other transaction is changing the state
            saved.clear()
            saved.update(self._state)
            self._shown = saved

        def restore() -> None:  # in-memory state changed inside follows the rollback
            self._state = dict(saved)
            self._shown = None

        def committed() -> None:
            self._shown = None

        return Transaction(
            self.db, self._lock, str(self.path), on_begin=save, on_rollback=restore, on_commit=committed
        )
