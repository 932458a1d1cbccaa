"""SQLite helpers of the buffer: the schema and an explicit transaction under a lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from types import TracebackType

import aiosqlite
import anyio
import structlog

from slmops.edge.errors import StoreError

__all__ = ["SCHEMA", "Transaction"]

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS models(
  id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, info BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY, t REAL NOT NULL, model INTEGER NOT NULL, label INTEGER NOT NULL,
  conf INTEGER NOT NULL, len INTEGER NOT NULL, lat INTEGER NOT NULL, err INTEGER NOT NULL,
  oos INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS feedback(
  id INTEGER PRIMARY KEY, t REAL NOT NULL, model INTEGER NOT NULL,
  true_label TEXT NOT NULL, pred_label TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox(
  seq INTEGER PRIMARY KEY, attempted INTEGER NOT NULL DEFAULT 0,
  bytes INTEGER NOT NULL, count INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS node_state(key TEXT PRIMARY KEY, value NUMERIC NOT NULL);
CREATE TABLE IF NOT EXISTS node_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dp_ledger(
  id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, epsilon REAL NOT NULL, t REAL NOT NULL);
"""


@dataclass(eq=False)
class Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on ``db`` while holding ``lock``, so statements of
    other tasks never land inside it. ``on_begin`` runs once the lock is held (where the
    caller saves the in-memory state its ``on_rollback`` restores: saved any earlier, a
    rollback would also undo what transactions committed meanwhile, e.g. a compaction's
    ``next_seq``); ``on_commit`` runs once ``COMMIT`` succeeded, still under the lock. On
    error it rolls back, calls ``on_rollback`` and
    raises ``StoreError`` for sqlite errors (other errors propagate as they are). Commit and
    rollback run shielded: a cancelled caller never leaves a transaction open."""

    db: aiosqlite.Connection
    lock: anyio.Lock
    where: str
    _: KW_ONLY
    on_rollback: Callable[[], None]
    on_begin: Callable[[], None] = lambda: None
    on_commit: Callable[[], None] = lambda: None

    async def __aenter__(self) -> None:
        await self.lock.acquire()
        try:
            self.on_begin()
            await self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self.on_rollback()  # nothing changed yet: ends what ``on_begin`` started
            self.lock.release()
            raise StoreError(self.where, f"cannot begin a transaction: {exc}") from exc
        except BaseException:
            self.on_rollback()
            self.lock.release()
            raise

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            with anyio.CancelScope(shield=True):
                if et is None:
                    try:
                        await self.db.execute("COMMIT")
                    except sqlite3.Error as exc:
                        await self._rollback()
                        raise StoreError(self.where, f"commit failed: {exc}") from exc
                    self.on_commit()
                    return False
                await self._rollback()
                if isinstance(e, sqlite3.Error):
                    raise StoreError(self.where, str(e)) from e
                return False
        finally:
            self.lock.release()
        return False

    async def _rollback(self) -> None:
        self.on_rollback()
        try:
            await self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # nothing to roll back (the error ended the transaction)
            log.debug("rollback_failed", error=repr(exc))
