"""The SQLite buffer (real files): group commit, window close, k-anonymity, seq across
restarts, the disk bound, the attempted mark and the DP ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from slmops.edge.buffer import Buffer, BufferStats
from slmops.edge.privacy import EventRow
from slmops.shared.messages import HistogramEdges, ModelRef, decode_telemetry

EDGES = HistogramEdges(confidence=[0.0, 0.5, 1.0], input_length=[0, 4, 1000], latency_ms=[0, 1, 1e6])
REF = ModelRef(name="m", version=1)


def make(path: Path, **kw: object) -> Buffer:
    args: dict[str, object] = {
        "fleet": "f",
        "node": "n",
        "k": 3,
        "window": 1.0,
        "outbox_max_bytes": 1 << 20,
        "clock": lambda: 1000.0,
    }
    args.update(kw)
    return Buffer(path, **args)  # type: ignore[arg-type]


def rows(mid: int, n: int, label: int = 0) -> list[EventRow]:
    return [EventRow(1000.0, mid, label, 1, 0, 0, 0)] * n


@asynccontextmanager
async def statistics_seen(buf: Buffer) -> AsyncIterator[list[BufferStats]]:
    """Every ``statistics()`` snapshot, taken at each checkpoint while the block runs (as a
    health request may read it at any of them)."""
    seen: list[BufferStats] = []
    watching, done = anyio.Event(), anyio.Event()

    async def watch() -> None:
        watching.set()
        while not done.is_set():
            seen.append(buf.statistics())
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await watching.wait()
        try:
            yield seen
        finally:
            done.set()


async def append_and_commit(buf: Buffer, rs: list[EventRow]) -> None:
    commit = await buf.append(rs)
    group = buf._gather(await buf._recv.receive())  # the writer's own steps, inline
    await buf._commit_group(group)
    assert commit.done.is_set()
    assert commit.error is None


@pytest.mark.anyio
async def test_window_close_numbers_aggregates_and_seq_survives_reopen(tmp_path: Path) -> None:
    """Each close makes one aggregate per model with the next seq; a reopened buffer
    continues the sequence from SQLite."""
    db = tmp_path / "t.db"
    async with make(db) as buf:
        info = await buf.register_model(REF, ["a", "b"], EDGES)
        await append_and_commit(buf, rows(info.model_id, 5))
        assert await buf.close_window(1001.0) == 1
        await append_and_commit(buf, rows(info.model_id, 4, label=1))
        assert await buf.close_window(1002.0) == 1
        assert await buf.outbox_counts() == [(1, 5), (2, 4)]
        assert await buf.pending_events() == 0
    async with make(db) as buf:
        info2 = await buf.register_model(REF, ["a", "b"], EDGES)
        assert info2.model_id == info.model_id
        await append_and_commit(buf, rows(info.model_id, 3))
        assert await buf.close_window(1003.0) == 1
        assert await buf.outbox_counts() == [(1, 5), (2, 4), (3, 3)]
        taken = await buf.outbox_take(10)
        assert [decode_telemetry(p).seq for _, p in taken] == [1, 2, 3]
        assert decode_telemetry(taken[1][1]).class_counts == {"b": 4}


@pytest.mark.anyio
async def test_window_below_k_is_carried_to_the_next(tmp_path: Path) -> None:
    """k-anonymity: 2 events (k=3) are not published alone; they join the next window."""
    async with make(tmp_path / "t.db") as buf:
        info = await buf.register_model(REF, ["a", "b"], EDGES)
        await append_and_commit(buf, rows(info.model_id, 2))
        assert await buf.close_window(1001.0) == 0
        assert await buf.pending_events() == 2
        assert buf.statistics().pending_events == 2
        await append_and_commit(buf, rows(info.model_id, 1))
        assert await buf.close_window(1002.0) == 1
        assert await buf.outbox_counts() == [(1, 3)]
        assert buf.statistics().pending_events == 0


@pytest.mark.anyio
async def test_tiny_bound_merges_unsent_windows_and_keeps_every_count(tmp_path: Path) -> None:
    """Past the bound, never-attempted aggregates merge into coarser windows; attempted ones
    are left alone; counts still sum to what was stored; seqs stay contiguous."""
    async with make(tmp_path / "t.db", k=1, outbox_max_bytes=1200) as buf:
        info = await buf.register_model(REF, ["a", "b"], EDGES)
        await append_and_commit(buf, rows(info.model_id, 1))
        await buf.close_window(1001.0)
        taken = await buf.outbox_take(1)  # seq 1 is now "attempted": never merged
        assert [s for s, _ in taken] == [1]
        total = 1
        for i in range(40):
            await append_and_commit(buf, rows(info.model_id, i + 1))
            total += i + 1
            await buf.close_window(1002.0 + i)
        counts = await buf.outbox_counts()
        stats = buf.statistics()
        assert counts[0] == (1, 1)
        assert [s for s, _ in counts] == list(range(1, len(counts) + 1))
        assert stats.outbox_bytes <= 1200
        assert stats.merges > 0
        assert sum(c for _, c in counts) + stats.dropped_inferences == total
        assert stats.next_seq == len(counts) + 1


@pytest.mark.anyio
async def test_when_merging_cannot_fit_a_loss_receipt_accounts_for_the_drop(tmp_path: Path) -> None:
    """Aggregates of alternating models cannot merge: the oldest are dropped and the next
    aggregate carries their count as ``dropped_inferences``."""
    refs = [ModelRef(name="m", version=v) for v in (1, 2)]
    async with make(tmp_path / "t.db", k=1, outbox_max_bytes=1024) as buf:
        infos = [await buf.register_model(r, ["a", "b"], EDGES) for r in refs]
        total = 0
        for i in range(12):
            await append_and_commit(buf, rows(infos[i % 2].model_id, 2))
            total += 2
            await buf.close_window(1001.0 + i)
        payloads = [decode_telemetry(p) for _, p in await buf.outbox_take(100)]
        stats = buf.statistics()
        assert stats.dropped_aggregates > 0
        receipts = sum(a.dropped_inferences for a in payloads)
        assert receipts == stats.dropped_inferences
        assert sum(a.count for a in payloads) + receipts == total


@pytest.mark.anyio
async def test_dp_noise_spends_budget_then_suppresses(tmp_path: Path) -> None:
    """With epsilon 1 and budget 2, two windows get geometric noise (ledger) and the third
    goes out with exact counts only."""
    async with make(tmp_path / "t.db", k=1, dp_epsilon=1.0, dp_budget=2.0) as buf:
        info = await buf.register_model(REF, ["a", "b"], EDGES)
        for i in range(3):
            await append_and_commit(buf, rows(info.model_id, 50))
            await buf.close_window(1001.0 + i)
        aggs = [decode_telemetry(p) for _, p in await buf.outbox_take(10)]
        assert [a.privacy.mechanism for a in aggs] == ["geometric", "geometric", "suppressed"]
        assert [a.count for a in aggs] == [50, 50, 50]
        assert aggs[2].class_counts == {}
        assert await buf.dp_spent() == pytest.approx(2.0)


@pytest.mark.anyio
async def test_retired_model_leftovers_below_k_go_out_as_counts_only(tmp_path: Path) -> None:
    """Events of a version no longer serving, fewer than k, go out at the first window close
    after the swap with their exact count and no distribution (old code waited two quiet
    windows, so a node stopped within them never published them). The serving model's
    leftovers below k keep waiting."""
    async with make(tmp_path / "t.db") as buf:
        old = await buf.register_model(REF, ["a", "b"], EDGES)
        new = await buf.register_model(ModelRef(name="m", version=2), ["a", "b"], EDGES)
        buf.current_model_id = new.model_id
        await append_and_commit(buf, rows(old.model_id, 2) + rows(new.model_id, 2))
        assert await buf.close_window(1001.0) == 1
        ((_, payload),) = await buf.outbox_take(5)
        agg = decode_telemetry(payload)
        assert agg.model == REF
        assert agg.count == 2
        assert agg.class_counts == {}
        assert agg.confidence.total == 0
        assert agg.privacy.mechanism == "suppressed"
        assert await buf.pending_events() == 2


@pytest.mark.anyio
async def test_an_idle_nodes_last_events_below_k_go_out_after_two_quiet_windows(tmp_path: Path) -> None:
    """The serving version's 2 events (k=3) wait for company while traffic may still come;
    after two windows without an event they are published as counts only, so a node that
    goes quiet (or is about to be stopped) still has every inference counted. Old code:
    they waited for ever."""
    async with make(tmp_path / "t.db") as buf:
        info = await buf.register_model(REF, ["a", "b"], EDGES)
        buf.current_model_id = info.model_id
        await append_and_commit(buf, rows(info.model_id, 2))
        assert await buf.close_window(1001.0) == 0
        assert await buf.close_window(1002.0) == 0
        assert await buf.close_window(1003.0) == 1
        ((_, payload),) = await buf.outbox_take(5)
        agg = decode_telemetry(payload)
        assert (agg.count, agg.class_counts, agg.privacy.mechanism) == (2, {}, "suppressed")
        assert agg.confidence.total == agg.input_length.total == agg.latency_ms.total == 0
        assert await buf.pending_events() == 0
        await append_and_commit(buf, rows(info.model_id, 3))  # k again: a full aggregate
        assert await buf.close_window(1004.0) == 1
        last = decode_telemetry((await buf.outbox_take(5))[-1][1])
        assert (last.count, last.class_counts) == (3, {"a": 3})


@pytest.mark.anyio
async def test_a_closing_window_shows_pending_or_in_the_outbox_never_neither(tmp_path: Path) -> None:
    """chaos (2 min, 3 nodes, seed 11): n2 answered 181, the cloud counted 159 + 21 receipts.
    The missing inference sat in the outbox of n2's duplicate-node twin (seq 2, count 1,
    never attempted): the bench drains a node until its health says outbox 0 and
    pending_events 0, then stops it. ``close_window`` took the events out of
    ``pending_events`` as its transaction committed but refreshed ``outbox_depth`` one SQLite
    trip later, so a health read in between said 0 and 0 while the aggregate was unpublished
    (and the twin's ``outbox_done`` of seq 1 had just set the depth to 0). Right: a
    ``statistics()`` snapshot shows every unpublished inference as pending or in the outbox.
    Real SQLite file; a task reads ``statistics()`` at every checkpoint, as a health request
    may."""
    async with make(tmp_path / "t.db", k=1) as buf:
        info = await buf.register_model(REF, ["a", "b"], EDGES)
        await append_and_commit(buf, rows(info.model_id, 3))
        async with statistics_seen(buf) as stats:
            assert await buf.close_window(1001.0) == 1  # the outbox was empty: seq 1
            assert [s for s, _ in await buf.outbox_take(10)] == [1]  # published, PubAck pending
            await append_and_commit(buf, rows(info.model_id, 1))
            async with anyio.create_task_group() as twin:  # seq 1's PubAck as seq 2's window closes
                twin.start_soon(buf.outbox_done, [1])
                twin.start_soon(buf.close_window, 1002.0)
        seen = [(s.pending_events, s.outbox_depth) for s in stats]
        assert await buf.outbox_counts() == [(2, 1)]
        assert (buf.statistics().pending_events, buf.statistics().outbox_depth) == (0, 1)
        drained = [i for i, (pending, depth) in enumerate(seen) if pending == 0 and depth == 0]
        assert not drained, f"drained while unpublished, at snapshots {drained[:5]} of {len(seen)}: {seen}"
