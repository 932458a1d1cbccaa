"""``slmops bench buffer``: telemetry events/s into the node's SQLite buffer vs bare aiosqlite.

project: ``Buffer.append`` from many concurrent producers (as micro-batches arrive), each
waiting for its group commit — the durable path of every answered inference — and then the
window close that turns them into one aggregate.
baseline: bare aiosqlite ``executemany`` of the same rows in 4096-row transactions into the
same schema (WAL, synchronous=NORMAL), one writer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from slmops.edge.buffer import Buffer
from slmops.edge.privacy import EventRow
from slmops.shared.messages import HistogramEdges, ModelRef

__all__ = ["run"]

_EDGES = HistogramEdges(
    confidence=[0.0, 0.5, 0.8, 0.9, 1.0], input_length=[0, 4, 16, 64, 1e6], latency_ms=[0, 1, 10, 1e6]
)


def _rows(n: int, model_id: int) -> list[EventRow]:
    return [EventRow(1_000_000.0 + i * 1e-3, model_id, i % 3, i % 4, i % 4, i % 3, 0) for i in range(n)]


async def _project(path: Path, total: int, chunk: int, producers: int) -> tuple[float, float]:
    now = [1_000_000.0]
    async with Buffer(
        path, fleet="bench", node="n1", k=1, window=60.0, outbox_max_bytes=1 << 24, clock=lambda: now[0]
    ) as buf:
        info = await buf.register_model(ModelRef(name="bench", version=1), ["a", "b", "c"], _EDGES)
        rows = _rows(chunk, info.model_id)
        per = total // (chunk * producers)

        async def producer() -> None:
            for _ in range(per):
                commit = await buf.append(rows)
                await commit.done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(buf.run_writer)
            t0 = time.perf_counter()
            async with anyio.create_task_group() as inner:
                for _ in range(producers):
                    inner.start_soon(producer)
            took = time.perf_counter() - t0
            n = per * chunk * producers
            t1 = time.perf_counter()
            made = await buf.close_window(now[0] + 60)
            close = time.perf_counter() - t1
            if made != 1:  # the bench must measure what it says it measures
                raise RuntimeError(f"window close made {made} aggregates, expected 1")
            tg.cancel_scope.cancel()
    return n / took, n / close


async def _baseline(path: Path, total: int) -> float:
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute(
            "CREATE TABLE events(id INTEGER PRIMARY KEY, t REAL NOT NULL, model INTEGER NOT NULL, "
            "label INTEGER NOT NULL, conf INTEGER NOT NULL, len INTEGER NOT NULL, lat INTEGER NOT NULL, "
            "err INTEGER NOT NULL, oos INTEGER NOT NULL DEFAULT 0)"
        )
        await db.commit()
        rows = _rows(4096, 1)
        t0 = time.perf_counter()
        for _ in range(total // 4096):
            await db.executemany(
                "INSERT INTO events(t, model, label, conf, len, lat, err, oos) VALUES (?,?,?,?,?,?,?,?)", rows
            )
            await db.commit()
        return (total // 4096) * 4096 / (time.perf_counter() - t0)
    finally:
        await db.close()


async def run(quick: bool = False) -> list[dict[str, Any]]:
    total = 40_960 if quick else 409_600
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmops-bench-buffer-") as tmp:
        for chunk, producers in ((32, 16), (1, 64)):
            # Baseline before and after each case, averaged: the shared machine's load drifts.
            before = await _baseline(Path(tmp) / f"bare-{chunk}-a.db", total)
            rate, close_rate = await _project(
                Path(tmp) / f"buf-{chunk}.db", total if chunk > 1 else total // 8, chunk, producers
            )
            base = (before + await _baseline(Path(tmp) / f"bare-{chunk}-b.db", total)) / 2
            results.append(
                {
                    "scenario": f"buffer append {chunk}-row batches",
                    "project": rate,
                    "baseline": base,
                    "ratio": rate / base,
                    "units": "events/s",
                    "producers": producers,
                    "rows_per_append": chunk,
                    "durable": True,
                    "window_close_events_per_s": close_rate,
                    "baseline_note": "bare aiosqlite executemany, 4096-row transactions",
                }
            )
    return results
