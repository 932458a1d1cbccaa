"""The short seeded chaos run (issue 13): real nats-server, ``slmops cloud`` and three
``slmops edge`` processes with traffic, two minutes of every fault kind (link cuts, ``kill -9``
of edges, cloud and server, disk-full spells on a tmpfs, clock jumps through libfaketime,
poison messages, a duplicate node id; edges killed under traffic), then an exact
reconciliation per node (a request a kill cut counts as stored whole or not at all). Only the pace,
the window (1 s) and the node count are shrunk; every timeout is the default. The 10-minute,
five-node run is ``slmops bench chaos``."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from _nats import free_port
from slmops.bench.chaos import FAKETIME_LIB, KINDS, drained, run_chaos


@pytest.mark.anyio
@pytest.mark.timeout(600)  # ~2 min of faults, then start-up and the drain: beyond the 120 s default
async def test_two_minutes_of_chaos_reconcile_exactly() -> None:
    if not FAKETIME_LIB.exists():
        pytest.skip(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y faketime")
    r = await run_chaos(minutes=2.0, nodes=3, seed=11)
    assert r["reconciled"], r
    assert set(r["faults"]) == set(KINDS)
    assert all(n >= 2 for n in r["faults"].values()), r["faults"]
    assert not r["skipped"], f"fault kinds skipped: {r['skipped']} ({r['note']})"
    assert r["answered"] > 0
    # Edges are killed under traffic: a request the kill cut was stored whole or not at all.
    assert r["answered"] + r["cut_stored"] == r["counted"] + r["receipts"]
    assert 0 <= r["cut_stored"] <= r["cut_texts"]
    assert r["double_counted"] == 0
    assert r["missing_seqs"] == 0
    assert r["poison_deadlettered"] >= r["poison_sent"] > 0
    assert any(row["installs"] >= 2 for row in r["per_node"])  # the duplicate node's own install


@pytest.mark.anyio
async def test_a_drain_is_concluded_by_agreeing_readings_not_one() -> None:
    """The bench drains an edge before it reconciles (and before SIGTERM of a duplicate-node
    twin). A health read between two steps of a window close once showed outbox 0 and
    pending 0 with an aggregate unpublished; the old drain returned on that one reading.
    Here a health endpoint answers such a transient reading first: the drain must go on
    until three readings agree, and return the settled one."""
    drained_ = {"outbox": 0, "pending_events": 0, "storage": "ok", "install": "i1", "next_seq": 7,
                "served": 30, "loss_receipt": {"lost_inferences": 2, "reported": 2}}  # fmt: skip
    script = [
        {**drained_, "next_seq": 6},  # the transient: looks drained, an aggregate still unpublished
        {**drained_, "outbox": 1, "next_seq": 7},
        {**drained_, "loss_receipt": {"lost_inferences": 2, "reported": 0}},
        drained_,
        {**drained_, "served": 31},  # a late answer: the agreement starts again
        {**drained_, "served": 31},
        {**drained_, "served": 31},
    ]
    served: list[dict[str, object]] = []

    async def health(_: web.Request) -> web.Response:
        reading = script[min(len(served), len(script) - 1)]
        served.append(reading)
        return web.json_response(reading)

    app = web.Application()
    app.router.add_get("/v1/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            got = await drained(f"http://127.0.0.1:{port}/v1/health", session, timeout=60)
    finally:
        await runner.cleanup()
    assert len(served) == 7, served
    assert got["served"] == 31
    assert got["drain_readings"] == 7
