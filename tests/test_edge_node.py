"""The node against a real nats-server: offline start then drain, privacy of every stored and
sent byte, the outbox bound over a long outage, and status reports."""

from __future__ import annotations

from pathlib import Path

import anyio
import nats
import pytest
from nats.js import JetStreamContext

from _edge_util import Keys, distinct_total, edge_config, read_raw, read_telemetry
from _nats import free_port, jetstream
from slmops.edge.node import EdgeNode
from slmops.shared.messages import NodeStatus, decode_json
from slmops.shared.names import STATUS_STREAM
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer


async def wait_drained(node: EdgeNode, timeout: float = 20.0) -> None:
    """Until every event is in a sent aggregate: no pending events, empty outbox. Both are read
    from the database, in that order: a window close moves events to the outbox in one
    transaction, while the cached ``health()["outbox"]`` is refreshed just after it."""
    with anyio.fail_after(timeout):
        while True:
            if await node.buffer.pending_events() == 0 and not await node.buffer.outbox_counts():
                return
            await anyio.sleep(0.05)


async def provision(store: Path) -> None:
    """Make slmops' streams and buckets in ``store`` through a server on another port, one no
    node is pointed at. The server a test then starts on ``store`` has them the moment it
    listens: a node that connects at once (before the test's own ``jetstream`` provisions)
    would otherwise send its ``connect`` status to a subject no stream holds yet, and lose it
    (seen under load: the first stored status was ``periodic``)."""
    async with EmbeddedServer(store_dir=store) as server, jetstream(server.url):
        pass


@pytest.mark.anyio
async def test_offline_start_serves_then_drains_when_the_server_appears(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """No server at start: the node answers, windows pile up in the outbox; once a server
    listens on the configured address, the outbox drains and the counts sum to N."""
    port = free_port()
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=f"nats://127.0.0.1:{port}", model=keys.bundle().path)
    n = 0
    async with EdgeNode(cfg) as node:
        for i in range(30):
            answers = await node.predict([f"alpha {i}", f"beta {i}"])
            assert len(answers) == 2
            n += 2
        await node.windower.tick()
        assert node.link.state.value != "online"
        assert node.health()["outbox"] >= 1
        await provision(tmp_path / "js")
        async with (
            EmbeddedServer(port=port, store_dir=tmp_path / "js") as server,
            jetstream(server.url) as js,
        ):
            await node.link.wait_online(timeout=10)
            for i in range(10):
                await node.predict([f"gamma {i}"])
                n += 1
            await wait_drained(node)
            total, _ = distinct_total(await read_telemetry(js, fleet))
            assert total == n
            assert node.health()["last_sync"] is not None
            # the node reported itself on connect: device profile, model, outbox
            sub = await js.pull_subscribe(f"slmops.status.{fleet}.n1", stream=STATUS_STREAM)
            first = decode_json((await sub.fetch(1, timeout=5))[0].data, NodeStatus)
            assert first.event == "connect"
            assert first.model is not None
            assert first.model.version == 1
            assert first.device.cores > 0
            assert first.device.ort_version


CANARIES = [
    "CANARY-7f3a9c1e",
    "jane.doe+secret@example.com",
    "+1 (415) 555-0134",
    "0044 20 7946 0958",
    "zq-canary-tail",
]


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.mark.anyio
async def test_no_input_text_reaches_disk_or_the_server(
    tmp_path: Path, keys: Keys, fleet: str, nats_server: EmbeddedServer, js: JetStreamContext
) -> None:
    """Canary strings, e-mail addresses and phone numbers in inputs appear in no byte of the
    data directory (SQLite db, -wal, -shm, model cache) and in no message on the server."""
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=keys.bundle().path)
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(timeout=10)
        answers = []
        for i in range(20):
            texts = [f"{c} alpha {i} call me" for c in CANARIES] + [" ".join(CANARIES)]
            answers += await node.predict(texts)
        await node.feedback(answers[0].prediction_id, "beta")
        await node.report_status("periodic")
        await wait_drained(node)
        while_running = all_bytes(cfg.data_path)
    after = all_bytes(cfg.data_path)
    aggs = await read_telemetry(js, fleet)
    assert sum(a.count for a in aggs) == 20 * (len(CANARIES) + 1)
    statuses = await read_raw(js, f"slmops.status.{fleet}.>", STATUS_STREAM)
    assert statuses
    assert decode_json(statuses[0], NodeStatus).device.cores > 0
    telemetry = await read_raw(js, f"slmops.telemetry.{fleet}.>", "SLMOPS_TELEMETRY")
    wire = b"".join(statuses + telemetry)
    for canary in CANARIES:
        for blob, where in ((while_running, "data dir (running)"), (after, "data dir"), (wire, "server")):
            for form in (canary, canary.lower(), canary.upper()):
                assert form.encode() not in blob, f"{form!r} found in {where}"
                assert form.encode("utf-16-le") not in blob, f"{form!r} (utf-16) found in {where}"


@pytest.mark.anyio
async def test_tiny_outbox_over_a_long_outage_compacts_and_still_sums_to_n(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """With a 2 KiB outbox and 60 windows offline the node keeps serving, merges old windows,
    and after reconnect the counts plus loss receipts equal N (and nothing was dropped,
    since merging suffices for one model)."""
    port = free_port()
    cfg = edge_config(
        tmp_path,
        keys,
        fleet=fleet,
        url=f"nats://127.0.0.1:{port}",
        model=keys.bundle().path,
        outbox_max_bytes=2048,
    )
    n = 0
    async with EdgeNode(cfg) as node:
        for w in range(60):
            await node.predict([f"alpha {w}"] * (1 + w % 5))
            n += 1 + w % 5
            await node.windower.tick()
        health = node.health()
        assert health["outbox_bytes"] <= 2048
        assert health["merged_windows"] > 0
        assert health["outbox"] < 60
        async with (
            EmbeddedServer(port=port, store_dir=tmp_path / "js") as server,
            jetstream(server.url) as js,
        ):
            await wait_drained(node)
            aggs = await read_telemetry(js, fleet)
            total, seen = distinct_total(aggs)
            receipts = sum(a.dropped_inferences for a in aggs)
            assert total + receipts == n
            assert receipts == node.health()["dropped_inferences"] == 0
            assert sorted(s for _, s in seen) == list(range(1, len(seen) + 1))
            assert sum(a.windows for a in aggs) >= 60


@pytest.mark.anyio
async def test_server_restart_loses_and_duplicates_nothing_and_dp_is_stated(
    tmp_path: Path, keys: Keys, fleet: str, private_server: EmbeddedServer
) -> None:
    """The server stops and comes back (same store): the node reconnects on its own and the
    distinct aggregates still sum to N. With DP on, each aggregate says what was applied."""
    nc = await nats.connect(private_server.url)
    try:
        await ensure_resources(nc.jetstream())
    finally:
        await nc.close()
    cfg = edge_config(
        tmp_path,
        keys,
        fleet=fleet,
        url=private_server.url,
        model=keys.bundle().path,
        dp_epsilon=2.0,
        min_count=5,
    )
    n = 0
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(timeout=10)
        for i in range(20):
            n += len(await node.predict([f"beta {i}", "gamma"]))
        await wait_drained(node)
        await private_server.stop_async(keep_store=True)
        for i in range(20):
            n += len(await node.predict([f"alpha {i}"]))
        await node.windower.tick()
        assert node.health()["outbox"] >= 1
        await private_server.start_async()
        await node.link.wait_online(timeout=20)
        await wait_drained(node, timeout=30)
    nc = await nats.connect(private_server.url)
    try:
        aggs = await read_telemetry(nc.jetstream(), fleet)
    finally:
        await nc.close()
    total, _ = distinct_total(aggs)
    assert total == n
    assert all(a.privacy.mechanism == "geometric" and a.privacy.epsilon == 2.0 for a in aggs)
    assert all(a.privacy.k == 5 and a.count >= 5 for a in aggs)


@pytest.mark.anyio
async def test_same_node_id_in_two_fleets_is_not_deduplicated_away(
    tmp_path: Path, keys: Keys, nats_server: EmbeddedServer, js: JetStreamContext
) -> None:
    """Node ids are unique per fleet only: ``n1`` of two fleets publishing seq 1 within the
    server's duplicate window must both be stored (the Nats-Msg-Id carries the fleet)."""
    from _nats import new_fleet

    fleets = [new_fleet(), new_fleet()]
    for i, f in enumerate(fleets):
        cfg = edge_config(tmp_path / f, keys, fleet=f, url=nats_server.url, model=keys.bundle().path)
        async with EdgeNode(cfg) as node:
            await node.link.wait_online(timeout=10)
            await node.predict(["alpha"] * (i + 1))
            await wait_drained(node)
    for i, f in enumerate(fleets):
        aggs = await read_telemetry(js, f)
        assert [(a.node, a.seq, a.count) for a in aggs] == [("n1", 1, i + 1)]
