"""``slmops bench chaos``: real processes under a seeded schedule of faults, then an exact
reconciliation (issue 13).

Processes: one nats-server (``EmbeddedServer``, file store), one ``slmops cloud``, ``nodes``
``slmops edge`` processes, each behind its own TCP proxy (``slmops.netproxy``) and with its
``--data`` on a tmpfs of its own (mounted here: root only; without it the disk-full kind is
skipped and the result says so). A traffic client per node counts what it was answered (HTTP
200s) — never the node's own counter.

Fault kinds (round-robin over a seeded shuffle, each at a seeded node, overlapping):

- ``link_cut``: the node's proxy refuses and drops connections for 3-12 s.
- ``kill_edge``: ``kill -9`` of an edge, restarted after 0.5-2 s.
- ``kill_cloud`` / ``kill_server``: ``kill -9`` of the cloud / the nats-server, restarted
  after 0.5-3 s (the server keeps its store).
- ``disk_full``: a filler file takes the node's tmpfs to ENOSPC for 4-12 s.
- ``clock_jump``: a RUNNING edge's wall clock moves to -30 min … +5 min of the true time,
  under traffic, without a restart. Every edge runs under libfaketime (``LD_PRELOAD``) reading
  its offset from a file (``FAKETIME_TIMESTAMP_FILE``, re-read on every call:
  ``FAKETIME_NO_CACHE``); the jump rewrites that file. ``FAKETIME_DONT_FAKE_MONOTONIC`` keeps
  ``CLOCK_MONOTONIC`` true, so asyncio's timers (the loop clock) do not stall — faking it is
  what stalled them when offsets were changed in a running process. Each jump is checked
  to have reached the process (the HTTP ``Date`` header of its next answer, within 3 s of
  the new offset: ``clock_jumps_seen``). Forward offsets stay within the cloud's default
  ``max_clock_skew`` (600 s): further ones are dead-lettered by design.
- ``poison``: 1-3 malformed or absurd telemetry messages published on the node's subject.
- ``duplicate_node``: a second edge process with the same node id (its own data dir, so its
  own install) serves traffic for 6-15 s, then drains and stops.

An edge is killed under traffic: its client keeps sending right up to the ``kill -9`` ("a
process killed at any instant restarts and carries on without losing or duplicating
telemetry"). A request the kill cuts (sent, then the connection lost: no answer) is
ambiguous — the edge answers after its group commit, so it may have been stored whole or not
at all; the client records each cut request's text count. A request that never reached the
edge (connection refused) is refused, not cut. At the end every fault is undone, traffic
stops, each edge drains its outbox, and per node, with ``cut_stored = counted + receipts -
answered``: ``cut_stored`` is the sum of some subset of the cut requests' sizes (each cut
request stored whole or not at all; none stored twice, no answered one lost), the cloud
counted no (install, seq) twice (its count equals the distinct sum in the stream), no seq gap
is missing, and every poison message is in the dead-letter stream. Answered counts the HTTP
200s only (issue 13's precise terms); loss receipts are ``dropped_inferences``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import msgspec
import nats
import nats.errors
from nats.aio.msg import Msg

from slmops.bench._proc import bench_key, stop_process, wait_healthy
from slmops.netproxy import TcpProxy
from slmops.shared.messages import decode_telemetry
from slmops.shared.names import DEADLETTER_STREAM, DEADLETTER_SUBJECT, TELEMETRY_STREAM, telemetry_subject
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

__all__ = ["KINDS", "faketime_env", "run", "run_chaos", "set_clock"]

KINDS = (
    "link_cut",
    "kill_edge",
    "kill_cloud",
    "kill_server",
    "disk_full",
    "clock_jump",
    "poison",
    "duplicate_node",
)
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
_HAVE_FAKETIME = FAKETIME_LIB.exists()
TEXTS = ["hello there", "my bill is wrong", "cannot log in", "how much is it", "thanks a lot"]


def set_clock(clock_file: Path, offset: int) -> None:
    """Set the wall-clock offset (seconds from the true time) of every process started with
    ``faketime_env(clock_file)``, at once (atomically: libfaketime re-reads the file on
    every call)."""
    tmp = clock_file.with_name(clock_file.name + ".new")
    tmp.write_text(f"{offset:+d}\n")
    os.replace(tmp, clock_file)


def faketime_env(clock_file: Path) -> dict[str, str]:
    """Environment for a process whose wall clock (``CLOCK_REALTIME``: ``time.time()``) is
    moved by ``set_clock(clock_file, ...)`` while it runs; its monotonic clock stays true
    (asyncio's loop clock). Needs libfaketime (``FAKETIME_LIB``; Debian package
    ``faketime``); the file is created at offset 0 if missing."""
    if not clock_file.exists():
        set_clock(clock_file, 0)
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME_TIMESTAMP_FILE": str(clock_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs; None if done, else why not."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


@dataclass
class EdgeProc:
    """One ``slmops edge`` process and what drives it."""

    node: str
    data: Path
    disk: Path | None
    port: int
    log: Path
    nats_url: str
    proxy: TcpProxy | None = None
    proc: anyio.abc.Process | None = None
    offset: int = 0  #: libfaketime offset of the wall clock, seconds (changed while running)
    paused: bool = False
    inflight: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    stopped: bool = False  #: the twin after its spell

    @property
    def clock_file(self) -> Path:
        """The file libfaketime reads this edge's wall-clock offset from (``+N``/``-N`` s)."""
        return self.log.with_name(self.log.stem + ".faketime")

    def set_offset(self, offset: int) -> None:
        """Move this edge's wall clock to ``offset`` s from the true time, now."""
        self.offset = offset
        set_clock(self.clock_file, offset)


@dataclass
class Chaos:
    tmp: Path
    fleet: str
    bundle: Path
    pub: Path
    window: str
    rng: random.Random
    server: EmbeddedServer
    edges: list[EdgeProc] = field(default_factory=list)
    cloud: anyio.abc.Process | None = None
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    #: Text counts of the requests a kill cut (sent, no answer): stored whole or not at all.
    cut: dict[str, list[int]] = field(default_factory=dict)
    poison_sent: Counter[str] = field(default_factory=Counter)
    disk_note: str | None = None
    #: Clock jumps the edge's own answers showed (its HTTP Date header) within 3 s.
    clock_jumps_seen: int = 0
    _twins: int = 0

    # -- processes --------------------------------------------------------------------------

    def _edge_args(self, e: EdgeProc) -> list[str]:
        url = e.proxy.url if e.proxy is not None else e.nats_url
        return [
            sys.executable, "-m", "slmops.cli", "--log-json", "--log-level", "info", "edge",
            "--nats", url, "--fleet", self.fleet, "--node", e.node, "--data", str(e.data),
            "--model", str(self.bundle), "--trust", str(self.pub),
            "--http", f"127.0.0.1:{e.port}", "--window", self.window, "--min-count", "1",
        ]  # fmt: skip

    async def start_edge(self, e: EdgeProc) -> None:
        env = dict(os.environ)
        if _HAVE_FAKETIME:  # always: a clock jump may come while it runs
            e.set_offset(e.offset)
            env.update(faketime_env(e.clock_file))
        with e.log.open("ab") as out:
            e.proc = await anyio.open_process(
                self._edge_args(e), stdout=out, stderr=subprocess.STDOUT, env=env
            )
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, f"http://127.0.0.1:{e.port}", proc=e.proc, log=e.log)

    async def stop_edge(self, e: EdgeProc, sig: int) -> None:
        if e.proc is None:
            return
        await stop_process(e.proc, sig)
        e.proc = None

    async def start_cloud(self) -> None:
        args = [
            sys.executable, "-m", "slmops.cli", "--log-json", "--log-level", "info", "cloud",
            "--nats", self.server.url, "--state", str(self.tmp / "cloud-state"), "--fleet", self.fleet,
        ]  # fmt: skip
        with (self.tmp / "cloud.log").open("ab") as out:
            self.cloud = await anyio.open_process(args, stdout=out, stderr=subprocess.STDOUT)

    async def stop_cloud(self, sig: int) -> None:
        if self.cloud is None:
            return
        await stop_process(self.cloud, sig)
        self.cloud = None

    # -- traffic ----------------------------------------------------------------------------

    async def traffic(
        self, e: EdgeProc, session: aiohttp.ClientSession, pace: float, stop: anyio.Event
    ) -> None:
        rng = random.Random(f"{e.node}-{e.port}")
        url = f"http://127.0.0.1:{e.port}/v1/predict"
        while not stop.is_set() and not e.stopped:
            await anyio.sleep(pace * (0.5 + rng.random()))
            if e.paused or e.proc is None or e.proc.returncode is not None:
                continue
            texts = [rng.choice(TEXTS) + f" {rng.randrange(10**6)}" for _ in range(rng.randint(1, 3))]
            e.inflight += 1
            try:
                async with session.post(url, json={"texts": texts}) as resp:
                    if resp.status == 200:
                        body = await resp.json()
                        self.answered[e.node] += len(body["predictions"])
                    else:
                        self.refused[e.node] += 1
            except aiohttp.ClientConnectorError:  # never reached the edge: nothing stored
                self.refused[e.node] += 1
            except (aiohttp.ClientError, TimeoutError):  # cut after sending: stored or not
                self.cut.setdefault(e.node, []).append(len(texts))
            finally:
                e.inflight -= 1

    async def quiesce(self, e: EdgeProc) -> None:
        e.paused = True
        with anyio.fail_after(60):
            while True:
                if not e.inflight:
                    return
                await anyio.sleep(0.02)

    # -- faults -----------------------------------------------------------------------------

    async def link_cut(self, e: EdgeProc, rng: random.Random) -> None:
        if e.proxy is None:
            return
        await e.proxy.cut()
        await anyio.sleep(rng.uniform(3, 12))
        await e.proxy.restore()

    async def kill_edge(self, e: EdgeProc, rng: random.Random) -> None:
        """``kill -9`` under traffic (no pause: a request in flight is cut, see the module
        docstring), restarted after 0.5-2 s."""
        async with e.lock:
            await self.stop_edge(e, signal.SIGKILL)
            await anyio.sleep(rng.uniform(0.5, 2))
            await self.start_edge(e)

    async def clock_jump(self, e: EdgeProc, rng: random.Random) -> None:
        """Move the running edge's wall clock (traffic goes on), then check it moved."""
        if not _HAVE_FAKETIME:
            self.skipped["clock_jump"] += 1
            return
        async with e.lock:
            e.set_offset(rng.choice([rng.randint(-1800, -60), rng.randint(60, 300)]))
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, ValueError, TypeError):
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{e.port}/v1/health") as resp,
                ):
                    seen = parsedate_to_datetime(resp.headers["Date"]).timestamp() - time.time()
                    if abs(seen - e.offset) <= 3:
                        self.clock_jumps_seen += 1

    async def kill_cloud(self, e: EdgeProc, rng: random.Random) -> None:
        await self.stop_cloud(signal.SIGKILL)
        await anyio.sleep(rng.uniform(0.5, 3))
        await self.start_cloud()

    async def kill_server(self, e: EdgeProc, rng: random.Random) -> None:
        await anyio.to_thread.run_sync(self.server.kill)
        await anyio.sleep(rng.uniform(0.5, 3))
        await anyio.to_thread.run_sync(self.server.start)

    async def disk_full(self, e: EdgeProc, rng: random.Random) -> None:
        if e.disk is None:
            self.skipped["disk_full"] += 1
            return
        filler = e.disk / "filler"
        chunk = bytes(1 << 16)
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            with contextlib.suppress(OSError):  # ENOSPC ends the filling
                while True:
                    os.write(fd, chunk)
        finally:
            os.close(fd)
        await anyio.sleep(rng.uniform(4, 12))
        filler.unlink()

    async def poison(self, e: EdgeProc, rng: random.Random) -> None:
        subject = telemetry_subject(self.fleet, e.node)
        sent = 0
        for _ in range(rng.randint(1, 3)):
            data = poison_message(self.fleet, e.node, rng)
            n = self.poison_sent[e.node] + sent
            with anyio.move_on_after(60):
                while True:  # the server may be down right now: publish once it is back
                    try:
                        nc = await nats.connect(self.server.url, allow_reconnect=False, connect_timeout=2)
                        try:
                            await nc.jetstream().publish(
                                subject, data, headers={"Nats-Msg-Id": f"poison/{e.node}/{n}"}, timeout=5
                            )
                        finally:
                            await nc.close()
                        sent += 1
                        break
                    except (nats.errors.Error, OSError, TimeoutError):
                        await anyio.sleep(0.5)
        self.poison_sent[e.node] += sent

    async def duplicate_node(self, e: EdgeProc, rng: random.Random) -> None:
        self._twins += 1
        twin = EdgeProc(
            node=e.node,
            data=self.tmp / f"twin-{self._twins}",
            disk=None,
            port=_free_port(),
            log=self.tmp / f"twin-{self._twins}.log",
            nats_url=self.server.url,
        )
        await self.start_edge(twin)
        stop = anyio.Event()
        async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
            tg.start_soon(self.traffic, twin, session, 0.2, stop)
            await anyio.sleep(rng.uniform(6, 15))
            await self.quiesce(twin)
            await self.drain(twin, session, timeout=180)
            stop.set()
            await self.stop_edge(twin, signal.SIGTERM)
            twin.stopped = True

    # -- the end ----------------------------------------------------------------------------

    async def drain(self, e: EdgeProc, session: aiohttp.ClientSession, timeout: float) -> dict[str, Any]:
        """Until the edge has every answered inference in a published aggregate: ``DRAIN_AGREE``
        consecutive health readings, ``DRAIN_GAP`` s apart, each drained and all the same
        (``_drain_mark``). One reading is not enough: a health read between two steps of a
        window close once showed outbox 0 and pending 0 with an aggregate unpublished."""
        return await drained(f"http://127.0.0.1:{e.port}/v1/health", session, timeout)


#: Consecutive agreeing readings that conclude a drain, and the seconds between readings.
DRAIN_AGREE, DRAIN_GAP = 3, 0.5


def _drain_mark(health: dict[str, Any]) -> tuple[Any, ...] | None:
    """What must stay the same across the readings of a drained edge, or None while it is
    not drained (outbox or pending events left, storage degraded, receipts not reported)."""
    receipt = health.get("loss_receipt", {})
    if not (
        health.get("outbox") == 0
        and health.get("pending_events") == 0
        and health.get("storage") == "ok"
        and receipt.get("lost_inferences") == receipt.get("reported")
    ):
        return None
    return (health.get("install"), health.get("next_seq"), health.get("served"), receipt.get("reported"))


async def drained(url: str, session: aiohttp.ClientSession, timeout: float) -> dict[str, Any]:
    """Poll the health at ``url`` until ``DRAIN_AGREE`` consecutive readings are drained
    and agree (``_drain_mark``); returns the last, with ``drain_readings``: how many
    readings it took. Raises ``TimeoutError`` after ``timeout`` s."""
    marks: list[tuple[Any, ...] | None] = []
    health: dict[str, Any] = {}
    with anyio.fail_after(timeout):
        while True:
            reading: dict[str, Any] | None = None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as resp:
                    reading = await resp.json()
            if reading is not None:
                health = reading
                marks.append(_drain_mark(health))
                last = marks[-DRAIN_AGREE:]
                if len(last) == DRAIN_AGREE and last[0] is not None and last.count(last[0]) == DRAIN_AGREE:
                    return {**health, "drain_readings": len(marks)}
            await anyio.sleep(DRAIN_GAP)


def poison_message(fleet: str, node: str, rng: random.Random) -> bytes:
    """One telemetry message the cloud must dead-letter (a kind at random)."""
    now = datetime.now(UTC)
    good: dict[str, Any] = {
        "v": 1, "fleet": fleet, "node": node, "install": "poison" + "0" * 26,
        "model": {"name": "chaos", "version": 1, "variant": "fp32"},
        "seq": rng.randrange(1, 10**9), "window_start": now - timedelta(seconds=60), "window_end": now,
        "count": 10, "errors": 0, "class_counts": {"a": 10},
        "confidence": {"edges": [0.0, 0.5, 1.0], "counts": [5, 5]},
        "input_length": {"edges": [0.0, 8.0, 1e9], "counts": [5, 5]},
        "latency_ms": {"edges": [0.0, 1.0, 1e9], "counts": [5, 5]},
        "privacy": {"k": 1},
    }  # fmt: skip
    kind = rng.randrange(6)
    if kind == 0:
        return b"\xc1 this is not msgpack"
    if kind == 1:
        good["count"] = -5
    elif kind == 2:
        good["count"] = 2**63 - 1
    elif kind == 3:
        good["window_end"] = datetime(9999, 1, 1, tzinfo=UTC)
    elif kind == 4:
        nested: Any = 1
        for _ in range(1000):
            nested = {"x": nested}
        good["unknown_field"] = nested
        return _deep_msgpack(good)
    else:
        good["errors"] = 50
    return msgspec.msgpack.encode(good)


def _deep_msgpack(obj: dict[str, Any]) -> bytes:
    """msgpack of ``obj`` whose ``unknown_field`` is nested 1,000 maps deep (built by hand:
    the encoder itself refuses such depth)."""
    inner = obj.pop("unknown_field")
    obj.pop("errors", None)  # room for one more key in a fixmap (at most 15)
    depth = 0
    while isinstance(inner, dict):
        depth += 1
        inner = inner["x"]
    body = msgspec.msgpack.encode(obj)
    # A fixmap header holds up to 15 entries: add one more key to the outer map.
    assert 0x80 <= body[0] <= 0x8E
    head = bytes([body[0] + 1]) + body[1:]
    key = msgspec.msgpack.encode("unknown_field")
    deep = (b"\x81" + msgspec.msgpack.encode("x")) * depth + msgspec.msgpack.encode(inner)
    return head + key + deep


async def _read_stream(url: str, subject: str, stream: str) -> list[Msg]:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, stream=stream)
        out: list[Any] = []
        want = (await sub.consumer_info()).num_pending or 0
        with anyio.fail_after(120):
            while len(out) < want:
                try:
                    msgs = await sub.fetch(min(512, want - len(out)), timeout=2)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for m in msgs:  # acked: unacked ones would stop at max_ack_pending
                    await m.ack()
                out.extend(msgs)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def _cloud_counts(url: str, fleet: str) -> dict[str, Any]:
    from slmops.cloud.ingest.query import fleet_status

    nc = await nats.connect(url, connect_timeout=5)
    try:
        return {s.node: s for s in await fleet_status(nc, fleet)}
    finally:
        await nc.close()


async def run_chaos(
    *, minutes: float = 10.0, nodes: int = 5, seed: int = 1, window: str = "1s", pace: float = 0.1
) -> dict[str, Any]:
    """Run the chaos scenario; returns the reconciliation (see the module docstring)."""
    from slmops.cloud.factory.build import build

    started = time.monotonic()
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="slmops-chaos-"))
    fleet = f"chaos{seed}x{rng.randrange(10**6)}"
    key, pub = bench_key(tmp)
    bundle = build(tmp / "bundle", key).bundle.path
    server = EmbeddedServer(store_dir=tmp / "jetstream")
    await anyio.to_thread.run_sync(server.start)
    mounts: list[Path] = []
    chaos = Chaos(tmp=tmp, fleet=fleet, bundle=bundle, pub=pub, window=window, rng=rng, server=server)
    try:
        nc = await nats.connect(server.url)
        await ensure_resources(nc.jetstream())
        await nc.close()
        for i in range(nodes):
            disk: Path | None = tmp / f"disk-{i}"
            why = _mount_tmpfs(disk, "24m")  # type: ignore[arg-type]
            if why is None:
                mounts.append(disk)  # type: ignore[arg-type]
            else:
                chaos.disk_note = f"no tmpfs ({why}): disk_full skipped"
                disk = None
            data = (disk or tmp / f"plain-{i}") / "data"
            chaos.edges.append(
                EdgeProc(node=f"n{i}", data=data, disk=disk, port=_free_port(), log=tmp / f"n{i}.log",
                         nats_url=server.url)
            )  # fmt: skip
        result = await _run(chaos, minutes, pace)
    finally:
        for e in chaos.edges:
            await chaos.stop_edge(e, signal.SIGKILL)
        await chaos.stop_cloud(signal.SIGKILL)
        await anyio.to_thread.run_sync(server.stop)
        for m in mounts:
            await anyio.run_process(["umount", "-l", str(m)], check=False)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    if result["reconciled"]:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        result["logs"] = str(tmp)
    return result


async def _run(chaos: Chaos, minutes: float, pace: float) -> dict[str, Any]:
    rng = chaos.rng
    stop_traffic = anyio.Event()
    async with contextlib.AsyncExitStack() as stack:
        for e in chaos.edges:
            e.proxy = await stack.enter_async_context(TcpProxy("127.0.0.1", chaos.server.port))
        await chaos.start_cloud()
        for e in chaos.edges:
            await chaos.start_edge(e)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        )
        async with anyio.create_task_group() as traffic:
            for e in chaos.edges:
                traffic.start_soon(chaos.traffic, e, session, pace, stop_traffic)
            # The schedule: a fault every `gap` seconds, kinds round-robin over seeded shuffles.
            total = max(len(KINDS), int(minutes * 60 / 7.5))
            gap = minutes * 60 / total
            kinds: list[str] = []
            while len(kinds) < total:
                round_ = list(KINDS)
                rng.shuffle(round_)
                kinds += round_
            deadline = time.monotonic() + minutes * 60
            async with anyio.create_task_group() as faults:
                for i, kind in enumerate(kinds[:total]):
                    at = time.monotonic() + gap * rng.uniform(0.6, 1.4)
                    target = chaos.edges[rng.randrange(len(chaos.edges))]
                    fault_rng = random.Random(rng.random())
                    fn: Callable[[EdgeProc, random.Random], Coroutine[Any, Any, None]] = getattr(chaos, kind)
                    chaos.faults[kind] += 1
                    faults.start_soon(fn, target, fault_rng, name=f"fault-{i}-{kind}")
                    await anyio.sleep(max(0.0, min(at, deadline) - time.monotonic()))
            # Every fault is undone here (each restores what it broke before returning).
            if chaos.cloud is None:
                await chaos.start_cloud()
            for e in chaos.edges:
                await chaos.quiesce(e)
            stop_traffic.set()
        drained = {}
        for e in chaos.edges:
            drained[e.node] = await chaos.drain(e, session, timeout=300)
        return await _reconcile(chaos, drained, minutes)


async def _reconcile(chaos: Chaos, drained: dict[str, Any], minutes: float) -> dict[str, Any]:
    url, fleet = chaos.server.url, chaos.fleet
    counted: dict[str, Any] = {}
    readings = 0
    with anyio.move_on_after(300):
        previous: dict[str, tuple[int, ...]] | None = None
        while True:
            counted = await _cloud_counts(url, fleet)
            readings += 1
            reached = all(
                (s := counted.get(node)) is not None and s.inferences + s.dropped_inferences >= n
                for node, n in chaos.answered.items()
            )
            now = {node: _count_mark(s) for node, s in counted.items()}
            if reached and now == previous:  # two readings 3 s apart agree: nothing late
                break
            previous = now if reached else None
            await anyio.sleep(3 if reached else 1)
    stored = await _read_stream(url, f"slmops.telemetry.{fleet}.>", TELEMETRY_STREAM)
    aggs = [
        decode_telemetry(m.data)
        for m in stored
        if not (m.headers or {}).get("Nats-Msg-Id", "").startswith("poison/")
    ]
    distinct: dict[tuple[str, str, int], int] = {}
    for a in aggs:
        distinct[(a.node, a.install, a.seq)] = a.count
    dead = await _read_stream(url, DEADLETTER_SUBJECT, DEADLETTER_STREAM)
    dead_by_node: Counter[str] = Counter()
    for m in dead:
        subject = (m.headers or {}).get("Slmops-Subject", "")
        if subject.startswith(f"slmops.telemetry.{fleet}."):
            dead_by_node[subject.rsplit(".", 1)[-1]] += 1
    per_node = []
    ok = True
    for node in sorted(set(chaos.answered) | set(counted)):
        s = counted.get(node)
        inferences = s.inferences if s else 0
        receipts = s.dropped_inferences if s else 0
        stream_sum = sum(c for (n, _, _), c in distinct.items() if n == node)
        cut = chaos.cut.get(node, [])
        row: dict[str, Any] = {
            "node": node,
            "answered": chaos.answered[node],
            "counted": inferences,
            "receipts": receipts,
            "cut_requests": len(cut),
            "cut_texts": sum(cut),
            "cut_stored": inferences + receipts - chaos.answered[node],
            "double_counted": inferences - stream_sum,
            "missing_seqs": s.missing_seqs if s else 0,
            "installs": s.installs if s else 0,
            "install_conflicts": len(s.install_conflicts) if s else 0,
            "duplicates_dropped": s.duplicates if s else 0,
            "poison_sent": chaos.poison_sent[node],
            "poison_deadlettered": dead_by_node[node],
            "refused": chaos.refused[node],
        }
        row["reconciled"] = (
            row["cut_stored"] in _subset_sums(cut)
            and row["double_counted"] == 0
            and row["missing_seqs"] == 0
            and row["poison_deadlettered"] >= row["poison_sent"]
        )
        ok = ok and bool(row["reconciled"])
        per_node.append(row)
    return {
        "scenario": "chaos",
        "minutes": minutes,
        "nodes": len(chaos.edges),
        "faults": dict(sorted(chaos.faults.items())),
        "skipped": dict(chaos.skipped),
        "note": chaos.disk_note,
        "clock_jumps_seen": chaos.clock_jumps_seen,
        "answered": sum(r["answered"] for r in per_node),
        "counted": sum(r["counted"] for r in per_node),
        "receipts": sum(r["receipts"] for r in per_node),
        "cut_requests": sum(r["cut_requests"] for r in per_node),
        "cut_texts": sum(r["cut_texts"] for r in per_node),
        "cut_stored": sum(r["cut_stored"] for r in per_node),
        "double_counted": sum(r["double_counted"] for r in per_node),
        "missing_seqs": sum(r["missing_seqs"] for r in per_node),
        "poison_sent": sum(r["poison_sent"] for r in per_node),
        "poison_deadlettered": sum(r["poison_deadlettered"] for r in per_node),
        "reconciled": ok,
        "count_readings": readings,
        "drain_readings": {node: h.get("drain_readings") for node, h in drained.items()},
        "per_node": per_node,
        "edges": {
            e.node: {
                "install": drained[e.node].get("install"),
                "quarantined": drained[e.node].get("quarantined"),
                "clock_offset_s": e.offset if _HAVE_FAKETIME else None,
            }
            for e in chaos.edges
        },
    }


def _count_mark(s: Any) -> tuple[int, ...]:
    """A node's cloud-side counts that must agree across the final readings."""
    return (s.inferences, s.dropped_inferences, s.missing_seqs, s.duplicates, s.installs)


def _subset_sums(sizes: list[int]) -> set[int]:
    """Every total that some subset of ``sizes`` adds up to (0 included)."""
    sums = {0}
    for n in sizes:
        sums |= {t + n for t in sums}
    return sums


async def run(quick: bool = False, **options: Any) -> list[dict[str, Any]]:
    """The bench-runner form: one result; ``project`` = what the cloud counted + receipts,
    ``baseline`` = what the traffic clients were answered (HTTP 200s). They differ by
    ``cut_stored``: requests a ``kill -9`` cut after the edge stored them (at most
    ``cut_texts``); the reconciliation checks that difference is a subset of the cut ones."""
    minutes = float(options.get("minutes", 2.0 if quick else 10.0))
    r = await run_chaos(minutes=minutes, nodes=int(options.get("nodes", 5)), seed=int(options.get("seed", 1)))
    total, base = r["counted"] + r["receipts"], r["answered"]
    return [{**r, "project": total, "baseline": base, "ratio": total / max(1, base),
             "units": "inferences"}]  # fmt: skip
