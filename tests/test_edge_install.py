"""Node install epochs (issue 13, fault 5): the install id lives in the same SQLite database as
``seq``, so a wiped, zero-length or quarantined database is a new install whose ``seq`` 1 is
not deduplicated away (by JetStream's ``Nats-Msg-Id`` window or by the cloud), and an
unreadable database is set aside while the node serves on with a fresh one."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import anyio
import pytest
from nats.js import JetStreamContext

from _edge_util import Keys, edge_config, read_telemetry
from slmops.edge.buffer import Buffer
from slmops.edge.node import EdgeNode
from slmops.shared.messages import TelemetryAggregate
from slmops.shared.server import EmbeddedServer

HEX32 = re.compile(r"[0-9a-f]{32}")


def by_install(aggs: list[TelemetryAggregate]) -> dict[tuple[str, str, int], int]:
    """``count`` per distinct ``(node, install, seq)``, asserting repeats agree."""
    seen: dict[tuple[str, str, int], int] = {}
    for a in aggs:
        key = (a.node, a.install, a.seq)
        assert seen.get(key, a.count) == a.count, f"{key} published twice with different counts"
        seen[key] = a.count
    return seen


async def drained(node: EdgeNode, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if not await node.buffer.pending_events() and not await node.buffer.outbox_counts():
                return
            await anyio.sleep(0.05)


async def one_life(cfg_kw: dict[str, object], keys: Keys, tmp: Path, fleet: str, n: int) -> str:
    """Start a node (default timeouts and backoff), answer ``n`` texts, drain, stop; its install."""
    cfg = edge_config(tmp, keys, fleet=fleet, publish_timeout=5.0, link_backoff_max=30.0, **cfg_kw)
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(timeout=10)
        for i in range(n):
            assert len(await node.predict([f"alpha {i}"])) == 1
        await node.windower.tick()
        await drained(node)
        assert node.health()["install"] == node.buffer.install
        return node.buffer.install


@pytest.mark.anyio
@pytest.mark.parametrize("loss", ["wiped", "zero_length"])
async def test_a_lost_database_is_a_new_install_and_its_windows_all_count(
    tmp_path: Path, keys: Keys, fleet: str, nats_server: EmbeddedServer, js: JetStreamContext, loss: str
) -> None:
    """Old code: the second life restarts at seq 1 under the same ``Nats-Msg-Id``, the server
    drops it as a duplicate (3 of 8 inferences counted)."""
    kw: dict[str, object] = {"url": nats_server.url, "model": keys.bundle().path}
    first = await one_life(kw, keys, tmp_path, fleet, 3)
    db = tmp_path / "data-n1" / "telemetry.db"
    if loss == "wiped":
        shutil.rmtree(db.parent)
    else:
        db.write_bytes(b"")
    second = await one_life(kw, keys, tmp_path, fleet, 5)
    assert HEX32.fullmatch(first)
    assert HEX32.fullmatch(second)
    assert first != second
    seen = by_install(await read_telemetry(js, fleet))
    assert sum(seen.values()) == 8, seen
    assert {i for _, i, _ in seen} == {first, second}
    for install in (first, second):  # each install numbers its own windows from 1, no gap
        seqs = sorted(s for _, i, s in seen if i == install)
        assert seqs == list(range(1, len(seqs) + 1)), (install, seqs)


@pytest.mark.anyio
async def test_install_id_survives_restarts_and_a_legacy_database_keeps_the_legacy_epoch(
    tmp_path: Path,
) -> None:
    """A reopened database keeps its id; a database written by the previous release (``seq``
    already running, no ``node_meta`` table) keeps install "" so its ``seq`` stays one
    sequence under the old ``Nats-Msg-Id`` form."""

    def buffer(path: Path) -> Buffer:
        return Buffer(
            path, fleet="f", node="n1", k=1, window=60.0, outbox_max_bytes=1 << 20, clock=lambda: 0.0
        )

    async with buffer(tmp_path / "new.db") as b:
        made = b.install
    async with buffer(tmp_path / "new.db") as b:
        assert b.install == made
        assert HEX32.fullmatch(made)

    legacy = tmp_path / "old.db"
    con = sqlite3.connect(legacy)
    con.executescript(
        "CREATE TABLE node_state(key TEXT PRIMARY KEY, value NUMERIC NOT NULL);"
        "INSERT INTO node_state VALUES ('next_seq', 7), ('sent', 6);"
    )
    con.commit()
    con.close()
    for _ in range(2):
        async with buffer(legacy) as b:
            assert b.install == ""
            assert b.statistics().next_seq == 7


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["half_truncated", "not_a_database"])
async def test_an_unreadable_database_is_quarantined_and_the_node_serves_on(
    tmp_path: Path, keys: Keys, fleet: str, damage: str
) -> None:
    """Old code: ``StoreError`` at start — the node exits and serves nothing."""
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=keys.bundle().path, link_backoff_max=30.0)
    async with EdgeNode(cfg) as node:
        for i in range(40):
            await node.predict([f"alpha {i}", f"beta {i}"])
            await node.windower.tick()  # offline: 40 aggregates wait in the outbox
        first = node.buffer.install
    db = tmp_path / "data-n1" / "telemetry.db"
    size = db.stat().st_size
    if damage == "half_truncated":
        with db.open("r+b") as f:
            f.truncate(size // 2)
    else:
        db.write_bytes(b"this is no SQLite file, whatever it was " * 100)
    async with EdgeNode(cfg) as node:
        assert len(await node.predict(["gamma"])) == 1
        health = node.health()
        assert health["status"] == "ok", health
        assert len(health["quarantined"]) == 1
        assert (db.parent / health["quarantined"][0]).stat().st_size > 0
        assert node.buffer.install != first
        assert HEX32.fullmatch(node.buffer.install)
        status = node._snapshot("periodic")
        assert status.quarantined == health["quarantined"]
        assert status.install == node.buffer.install
        await node.windower.tick()
        assert await node.buffer.outbox_counts() == [(1, 1)]  # a new epoch from seq 1
