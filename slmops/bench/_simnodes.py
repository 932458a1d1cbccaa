"""Simulated edge nodes for ``slmops bench fleet``, run as a child process so their CPU is not
the cloud's: ``python -m slmops.bench._simnodes MODE --url U --fleet F --nodes N ...``.

What goes on the wire is what real nodes send: each node publishes on its own subject
(``slmops.telemetry.<fleet>.<node>``) with its own ``Nats-Msg-Id``
(``<fleet>/<node>/<install>:<seq>``), aggregates made by the edge's own
``edge.window.build_aggregate`` from event cells (class, confidence, length and latency bins),
and ``NodeStatus`` reports on ``slmops.status.<fleet>.<node>`` by core publish, as
``edge.status.StatusReporter`` does. Windows are 60 s of simulated time compressed into
``--period`` seconds of wall time. Many nodes share a modest number of connections
(``--conns``) in steady state; in ``storm`` every reconnecting node has its own connection.

Modes (each prints JSON lines on stdout, times from ``time.time()``):

``steady``  ``--minutes`` windows per node, one per ``--period`` s. ``--outage`` of the nodes
            (a deterministic share) are offline for a few windows each and send what they
            buffered on return (a reconnect burst). Line per window: ``{"w", "t", "sent"}``.
``storm``   the first ``--storm`` share of nodes reconnect at once, each on its own
            connection, each with ``--backlog`` buffered windows (seqs after ``--from-seq``).
            Lines ``connected`` (connections, seconds) and ``done`` (sent, seconds).
``bare``    the same messages as ``steady`` (other fleet id), published back to back: the
            bare JetStream publish baseline. Line ``done``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import nats
import numpy as np
from nats.aio.client import Client as NATS

from slmops.bench._fleet import COND, CONF_P, LABELS, LAT_P, LEN_P, MODEL, PRIOR, manifest_for
from slmops.edge.window import Cell, ModelInfo, build_aggregate
from slmops.shared import names
from slmops.shared.messages import (
    Assignment,
    DeviceProfile,
    NodeStatus,
    decode_json,
    encode_json,
    encode_telemetry,
)

#: Simulated time of window 1's start (seconds since the epoch); windows are 60 s.
T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
WINDOW_S = 60.0
#: Distinct cell patterns (a node uses ``pattern[i % PATTERNS]``): building cells per node per
#: window would make the simulator, not the cloud, the bottleneck.
PATTERNS = 64
#: Publishes awaited at once per connection (bounded in flight, like the edge's outbox).
IN_FLIGHT = 512
#: A PubAck not back within this many seconds: the message is sent again (same Nats-Msg-Id).
ACK_WAIT_S = 20.0
RETRIES = 10
#: Messages sent again for want of a PubAck (reported; the stream dedupes them).
RESENT = 0


def node_name(i: int) -> str:
    return f"n{i:06d}"


def _patterns(seed: int) -> list[list[Cell]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(PATTERNS):
        n = int(rng.choice([100, 200, 400, 800]))
        mix = rng.dirichlet(PRIOR * 200.0)
        classes = rng.multinomial(n, COND @ mix)
        cells: list[Cell] = []
        for label, c in enumerate(classes):
            if c == 0:
                continue
            conf = rng.multinomial(int(c), CONF_P)
            lens = rng.multinomial(int(c), LEN_P)
            lats = rng.multinomial(int(c), LAT_P)
            # One cell per confidence bin, length and latency bins drawn per cell: the
            # per-class histogram shapes come out right, which is all drift reads.
            lb = np.repeat(np.arange(len(LEN_P)), lens)
            tb = np.repeat(np.arange(len(LAT_P)), lats)
            k = 0
            for cb, m in enumerate(conf):
                if m:
                    cells.append((label, cb, int(lb[k]), int(tb[k]), 0, int(m)))
                    k += int(m)
        out.append(cells)
    return out


class Nodes:
    """The aggregates and status reports of ``n`` simulated nodes of ``fleet``."""

    def __init__(self, fleet: str, n: int, seed: int = 1) -> None:
        m = manifest_for()
        self.fleet = fleet
        self.n = n
        self.info = ModelInfo(model_id=1, ref=MODEL, labels=list(LABELS), edges=m.edges)
        self.cells = _patterns(seed)

    def message(self, i: int, seq: int) -> tuple[str, bytes, dict[str, str]]:
        node, install = node_name(i), f"{i + 1:032x}"
        start = T0 + (seq - 1) * WINDOW_S
        agg = build_aggregate(
            fleet=self.fleet, node=node, info=self.info, seq=seq, start=start, end=start + WINDOW_S,
            cells=self.cells[i % PATTERNS], k=5, install=install,
        )  # fmt: skip
        mid = names.msg_id(node, seq, fleet=self.fleet, install=install)
        return names.telemetry_subject(self.fleet, node), encode_telemetry(agg), {"Nats-Msg-Id": mid}

    def status(
        self, i: int, seq: int, event: str = "periodic", version: int | None = None
    ) -> tuple[str, bytes]:
        node = node_name(i)
        model = MODEL if version is None else msgspec.structs.replace(MODEL, version=version)
        s = NodeStatus(
            fleet=self.fleet, node=node, time=datetime.now(UTC), event=event,
            device=DeviceProfile(memory_mb=512 if i % 2 else 4096, cores=2), model=model,
            last_seq=seq, install=f"{i + 1:032x}", storage="ok",
        )  # fmt: skip
        return names.status_subject(self.fleet, node), encode_json(s)


async def _publish(
    nc: NATS, msgs: Iterator[tuple[str, bytes, dict[str, str]]], in_flight: int = IN_FLIGHT
) -> int:
    """Publish like the edge's outbox: at most ``in_flight`` PubAcks outstanding, and a message
    whose PubAck did not come within ``ACK_WAIT_S`` (or came as an error) is sent again with
    the same ``Nats-Msg-Id`` (the stream drops the copy if the first one was stored). Returns
    how many were acknowledged; raises ``RuntimeError`` after ``RETRIES`` rounds."""
    js = nc.jetstream()
    sent = 0
    chunk: list[tuple[str, bytes, dict[str, str]]] = []

    async def flush(items: list[tuple[str, bytes, dict[str, str]]]) -> None:
        global RESENT
        for _attempt in range(RETRIES):
            futs = [await js.publish_async(s, d, headers=h) for s, d, h in items]
            with anyio.move_on_after(ACK_WAIT_S):
                for f in futs:
                    with contextlib.suppress(Exception):  # an error answer: sent again below
                        await f
            items = [m for m, f in zip(items, futs, strict=True) if not f.done() or f.exception()]
            for f in futs:
                if not f.done():
                    f.cancel()
            if not items:
                return
            RESENT += len(items)
        raise RuntimeError(f"{len(items)} messages without PubAck after {RETRIES} rounds")

    for m in msgs:
        chunk.append(m)
        if len(chunk) >= in_flight:
            await flush(chunk)
            sent += len(chunk)
            chunk = []
    if chunk:
        await flush(chunk)
    return sent + len(chunk)


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _offline(i: int, w: int, share: float, minutes: int) -> bool:
    """Node ``i`` is offline in window ``w``: a ``share`` of the nodes (every 1/share-th) are
    out for 3 windows starting at a node-dependent window, then send what they buffered."""
    if share <= 0 or minutes < 6:
        return False
    every = max(1, round(1 / share))
    if i % every:
        return False
    start = 2 + (i // every) % (minutes - 4)
    return start <= w < start + 3


async def _connect(url: str, name: str) -> NATS:
    return await nats.connect(url, name=name, max_reconnect_attempts=-1, connect_timeout=30)


async def steady(a: argparse.Namespace) -> None:
    nodes = Nodes(a.fleet, a.nodes)
    conns = [await _connect(a.url, f"sim-{c}") for c in range(a.conns)]
    owned = [range(c, a.nodes, a.conns) for c in range(a.conns)]
    seq = [0] * a.nodes
    sent = 0
    t_start = time.time()
    try:
        for w in range(1, a.minutes + 1):
            due = t_start + (w - 1) * a.period
            await anyio.sleep(max(0.0, due - time.time()))

            def window(c: int, w: int = w) -> Iterator[tuple[str, bytes, dict[str, str]]]:
                for i in owned[c]:
                    if _offline(i, w, a.outage, a.minutes):
                        continue
                    while seq[i] < w:  # the window, or a reconnect burst of the buffered ones
                        seq[i] += 1
                        yield nodes.message(i, seq[i])

            counts = [0] * a.conns

            async def one(c: int, w: int = w, counts: list[int] = counts) -> None:
                counts[c] = await _publish(conns[c], window(c))
                for i in owned[c]:
                    if not _offline(i, w, a.outage, a.minutes):
                        await conns[c].publish(*nodes.status(i, seq[i]))
                await conns[c].flush()

            async with anyio.create_task_group() as tg:
                for c in range(a.conns):
                    tg.start_soon(one, c)
            sent += sum(counts)
            _emit(event="window", w=w, t=time.time(), sent=sent)
    finally:
        for nc in conns:
            await nc.close()
    _emit(event="done", t=time.time(), sent=sent, seconds=time.time() - t_start, resent=RESENT)


async def storm(a: argparse.Namespace) -> None:
    nodes = Nodes(a.fleet, a.nodes)
    every = max(1, round(1 / a.storm))
    members = list(range(0, a.nodes, every))
    t0 = time.time()
    conns: dict[int, NATS] = {}

    async def connect(i: int) -> None:
        conns[i] = await _connect(a.url, node_name(i))

    limiter = anyio.CapacityLimiter(a.connect_parallel)

    async def connect_limited(i: int) -> None:
        async with limiter:
            await connect(i)

    try:
        async with anyio.create_task_group() as tg:
            for i in members:
                tg.start_soon(connect_limited, i)
        _emit(event="connected", t=time.time(), connections=len(conns), seconds=time.time() - t0)
        sent = [0]

        async def drain(i: int) -> None:
            nc = conns[i]
            await nc.publish(*nodes.status(i, a.from_seq, "connect"))
            msgs = (nodes.message(i, s) for s in range(a.from_seq + 1, a.from_seq + a.backlog + 1))
            sent[0] += await _publish(nc, msgs, a.in_flight)

        async with anyio.create_task_group() as tg:
            for i in members:
                tg.start_soon(drain, i)
        _emit(event="done", t=time.time(), sent=sent[0], seconds=time.time() - t0, nodes=len(members),
              resent=RESENT)  # fmt: skip
    finally:
        for nc in conns.values():
            await nc.close()


async def adopt(a: argparse.Namespace) -> None:
    """Nodes that follow their assignments: a watch on the fleet's assignment keys, and for
    each node key naming a version, a status from that node reporting the version installed
    (as an edge node does once it has swapped; no bundle is fetched). Ends once every node
    reported ``--version``, or after ``--minutes`` minutes."""
    nc = await _connect(a.url, "sim-adopt")
    nodes = Nodes(a.fleet, a.nodes)
    index = {node_name(i): i for i in range(a.nodes)}
    on: set[str] = set()
    t0 = time.time()
    try:
        kv = await nc.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
        watcher = await kv.watch(f"{a.fleet}.*")
        _emit(event="ready", t=time.time())
        while len(on) < a.nodes and time.time() - t0 < a.minutes * 60:
            entry = await watcher.updates(timeout=a.minutes * 60)  # type: ignore[no-untyped-call]
            if entry is None or entry.value is None or entry.operation is not None:
                continue  # the initial-values marker, a delete or a purge
            node = entry.key.split(".", 1)[1]
            if node not in index:
                continue  # the fleet-wide key
            version = decode_json(entry.value, Assignment).version
            await nc.publish(*nodes.status(index[node], a.from_seq, version=version))
            if version == a.version:
                on.add(node)
            else:
                on.discard(node)
        await nc.flush()
        await watcher.stop()  # type: ignore[no-untyped-call]
    finally:
        await nc.close()
    _emit(event="done", t=time.time(), adopted=len(on), seconds=time.time() - t0)


async def bare(a: argparse.Namespace) -> None:
    nodes = Nodes(a.fleet, a.nodes)
    conns = [await _connect(a.url, f"bare-{c}") for c in range(a.conns)]
    t0 = time.time()
    counts = [0] * a.conns

    async def one(c: int) -> None:
        msgs = (nodes.message(i, w) for w in range(1, a.minutes + 1) for i in range(c, a.nodes, a.conns))
        counts[c] = await _publish(conns[c], msgs)

    try:
        async with anyio.create_task_group() as tg:
            for c in range(a.conns):
                tg.start_soon(one, c)
    finally:
        for nc in conns:
            await nc.close()
    _emit(event="done", t=time.time(), sent=sum(counts), seconds=time.time() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m slmops.bench._simnodes")
    p.add_argument("mode", choices=("steady", "storm", "bare", "adopt"))
    p.add_argument("--url", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--minutes", type=int, default=5)
    p.add_argument("--period", type=float, default=2.0)
    p.add_argument("--outage", type=float, default=0.02)
    p.add_argument("--storm", type=float, default=0.1)
    p.add_argument("--backlog", type=int, default=1440)
    p.add_argument("--from-seq", type=int, default=0)
    p.add_argument("--connect-parallel", type=int, default=1000)
    p.add_argument("--in-flight", type=int, default=64, help="storm: PubAcks outstanding per node")
    p.add_argument("--version", type=int, default=2, help="adopt: the version every node ends on")
    a = p.parse_args(argv)
    anyio.run({"steady": steady, "storm": storm, "bare": bare, "adopt": adopt}[a.mode], a)


if __name__ == "__main__":
    main()
