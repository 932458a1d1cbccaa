"""The short seeded chaos run (issue 13): real nats-server, ``slmops cloud`` and three
``slmops edge`` processes with traffic, two minutes of every fault kind (link cuts, ``kill -9``
of edges, cloud and server, disk-full spells on a tmpfs, clock jumps through libfaketime,
poison messages, a duplicate node id; edges killed under traffic), then an exact
reconciliation per node (a request a kill cut counts as stored whole or not at all). Only the pace,
the window (1 s) and the node count are shrunk; every timeout is the default. The 10-minute,
five-node run is ``slmops bench chaos``."""

from __future__ import annotations

import pytest

from slmops.bench.chaos import FAKETIME_LIB, KINDS, run_chaos


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
