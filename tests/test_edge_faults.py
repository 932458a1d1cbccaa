"""Exactly-once effect under faults, with real parts: a node subprocess (`slmops edge`) driven
over HTTP, its link cut and restored by a TCP proxy, and three `kill -9` restarts. The distinct
``(node, seq)`` aggregates in SLMOPS_TELEMETRY must sum to exactly the inferences answered."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import IO

import aiohttp
import anyio
import anyio.abc
import pytest
from nats.js import JetStreamContext

from _edge_util import Keys, distinct_total, edge_cli, kill, read_telemetry, terminate, wait_counted
from _nats import free_port, jetstream
from _proxy import TcpProxy
from slmops.bench._proc import wait_healthy
from slmops.shared.server import EmbeddedServer


async def wait_ready(session: aiohttp.ClientSession, base: str, proc: anyio.abc.Process, log: Path) -> None:
    await wait_healthy(session, base, proc=proc, log=log, timeout=30, interval=0.05)


async def predict_batch(session: aiohttp.ClientSession, base: str, texts: list[str]) -> int:
    async with session.post(base + "/v1/predict", json={"texts": texts}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        return len(body["predictions"])


@pytest.mark.anyio
async def test_exactly_once_across_link_cuts_and_three_kill9_restarts(
    tmp_path: Path, fleet: str, private_server: EmbeddedServer
) -> None:
    keys = Keys(tmp_path / "keys")
    bundle = keys.bundle()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "node.log"
    answered = 0
    async with jetstream(private_server.url) as js:
        async with TcpProxy("127.0.0.1", private_server.port) as proxy, aiohttp.ClientSession() as session:
            args = [
                *edge_cli(proxy.url, fleet, "n1", tmp_path / "data", bundle.path, keys, port),
                "--status-interval", "1s",
            ]  # fmt: skip
            for life in range(4):
                out: IO[bytes] = log.open("ab")
                proc = await anyio.open_process(args, stdout=out, stderr=subprocess.STDOUT)
                try:
                    await wait_ready(session, base, proc, log)
                    for rnd in range(6):
                        async with anyio.create_task_group() as tg:
                            counts: list[int] = []

                            async def go(i: int, counts: list[int] = counts, rnd: int = rnd) -> None:
                                counts.append(
                                    await predict_batch(session, base, [f"alpha {rnd} {i}"] * (1 + i % 3))
                                )

                            for i in range(8):
                                tg.start_soon(go, i)
                        answered += sum(counts)
                        if rnd == 1:
                            await proxy.cut()  # the node keeps answering while cut
                        elif rnd == 3:
                            await proxy.restore()
                        await anyio.sleep(0.07 * (life + 1))  # lands kills at varied window phases
                    if life < 3:
                        if life == 1:
                            await proxy.cut()  # one kill while the link is down
                        proc.send_signal(signal.SIGKILL)
                        await proc.wait()
                        await proxy.restore()
                    else:
                        await wait_counted(js, fleet, answered, 60)
                        await terminate(proc, log)
                finally:
                    await kill(proc)
                    out.close()
        aggs = await read_telemetry(js, fleet)
        total, seen = distinct_total(aggs)
        assert total == answered, f"telemetry counts {total}, answered {answered}"
        assert sorted(seq for _, seq in seen) == list(range(1, len(seen) + 1)), "a gap in seq"
        assert all(a.dropped_inferences == 0 for a in aggs)


@pytest.mark.anyio
async def test_kill9_under_load_loses_no_answered_inference(
    tmp_path: Path, fleet: str, nats_server: EmbeddedServer, js: JetStreamContext
) -> None:
    """``kill -9`` while 16 clients are mid-request: after a restart the telemetry holds every
    answered inference, and at most the ones that were sent (an unanswered request may or
    may not have been counted — the app never got its answer)."""
    keys = Keys(tmp_path / "keys")
    bundle = keys.bundle()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "node.log"
    args = edge_cli(nats_server.url, fleet, "n2", tmp_path / "data", bundle.path, keys, port)
    answered = sent = 0
    enough = anyio.Event()
    async with aiohttp.ClientSession() as session:
        for life in range(2):
            with log.open("ab") as out:
                proc = await anyio.open_process(args, stdout=out, stderr=subprocess.STDOUT)
            try:
                await wait_ready(session, base, proc, log)
                if life == 1:
                    break

                async def client(i: int) -> None:
                    nonlocal answered, sent
                    while True:
                        sent += 2
                        try:
                            answered += await predict_batch(session, base, [f"beta {i}", f"gamma {i}"])
                        except (aiohttp.ClientError, AssertionError):
                            return  # the node died under this request
                        if answered >= 100:
                            enough.set()

                async with anyio.create_task_group() as tg:
                    for i in range(16):
                        tg.start_soon(client, i)
                    with anyio.fail_after(30):
                        await enough.wait()  # well into the load, windows closing
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
            finally:
                if proc.returncode is None and life == 0:
                    proc.kill()
                    await proc.wait()
        try:
            await wait_counted(js, fleet, answered, 30)
        finally:
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                await proc.wait()
    total, _ = distinct_total(await read_telemetry(js, fleet))
    assert answered <= total <= sent, (answered, total, sent)
