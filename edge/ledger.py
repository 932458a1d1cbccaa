"""The differential-privacy budget ledger that outlives installs (issue 17).

The telemetry database holds a ``dp_ledger`` table written in the window's transaction, but a
wiped or quarantined database is a new install (docs/architecture.md §5) and would start that
table at zero: a fresh budget for the same device. ``PrivacyLedger`` is a separate SQLite file
(``EdgeConfig.dp_ledger_path``), keyed by fleet and node, never by install: a new install id
reads what its predecessors spent. It is written *before* the aggregate that spends it is
committed, so a crash in between over-counts (the safe side), never under-counts. Pushed
configuration changes nothing here: a new ``dp_budget`` is compared with what was spent.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio.to_thread

__all__ = ["PrivacyLedger"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend(
    fleet TEXT NOT NULL, node TEXT NOT NULL, install TEXT NOT NULL,
    seq INTEGER NOT NULL, epsilon REAL NOT NULL, t REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_node ON spend(fleet, node);
"""


class PrivacyLedger:
    """Epsilon spent by one node (``fleet``, ``node``) over all its installs. Each call opens
    the file, so nothing stays open between windows (one call per published window)."""

    def __init__(self, path: Path, *, fleet: str, node: str) -> None:
        self.path = Path(path)
        self.fleet, self.node = fleet, node

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        return db

    def _spent(self) -> float:
        db = self._connect()
        try:
            row = db.execute(
                "SELECT coalesce(sum(epsilon), 0) FROM spend WHERE fleet=? AND node=?",
                (self.fleet, self.node),
            ).fetchone()
            return float(row[0])
        finally:
            db.close()

    def _spend(self, install: str, seq: int, epsilon: float) -> None:
        db = self._connect()
        try:
            db.execute(
                "INSERT INTO spend(fleet, node, install, seq, epsilon, t) VALUES (?,?,?,?,?,?)",
                (self.fleet, self.node, install, seq, epsilon, time.time()),
            )
        finally:
            db.close()

    async def spent(self) -> float:
        """Total epsilon this node spent, every install counted. Raises ``sqlite3.Error`` /
        ``OSError`` when the ledger cannot be read (the caller then publishes no noised
        histograms: spending blind could exceed the budget)."""
        return await anyio.to_thread.run_sync(self._spent)

    async def spend(self, install: str, seq: int, epsilon: float) -> None:
        """Record ``epsilon`` spent by window ``seq`` of ``install`` (durably, before use)."""
        await anyio.to_thread.run_sync(self._spend, install, seq, epsilon)

    async def carry(self, install: str, epsilon: float) -> None:
        """Record ``epsilon`` spent before this ledger existed (read from an older
        database's own table), as one row of ``seq`` 0."""
        if epsilon > 0:
            await self.spend(install, 0, epsilon)
