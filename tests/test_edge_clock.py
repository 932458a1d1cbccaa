"""Wall-clock jumps inside a RUNNING edge (issue 13, fault 6 and the chaos run's
``clock_jump``): a real ``slmops edge`` process under libfaketime whose offset file is
rewritten while it serves (``slmops.bench.chaos.faketime_env``: the wall clock moves, the
monotonic clock that asyncio runs on does not). Jumps of +5 min and then -30 min: the node
keeps answering and closing windows, its windows follow its (jumped) clock, and every
aggregate passes the cloud's own checks against the server's timestamp, so
answered == counted with no seq gap. Default settings; only the window (1 s) and k (1)
shrink."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp
import anyio
import pytest
from nats.js import JetStreamContext

from _edge_proc import Client, start
from _edge_util import Keys, edge_cli, kill, terminate
from _nats import free_port
from slmops.bench.chaos import FAKETIME_LIB, faketime_env, set_clock
from slmops.cloud.ingest.consumers import check_telemetry
from slmops.shared.messages import TelemetryAggregate
from slmops.shared.names import TELEMETRY_STREAM
from slmops.shared.server import EmbeddedServer


async def node_clock(client: Client) -> float:
    """The node's wall clock minus ours, in seconds, from its HTTP ``Date`` header (±1 s)."""
    async with client.session.get(client.base + "/v1/health") as resp:
        return parsedate_to_datetime(resp.headers["Date"]).timestamp() - time.time()


async def checked_telemetry(js: JetStreamContext, fleet: str) -> list[TelemetryAggregate]:
    """Every aggregate of ``fleet``, each passed through the cloud's ``check_telemetry``
    (decode, ids, ranges; times against the message's JetStream timestamp)."""
    sub = await js.pull_subscribe(f"slmops.telemetry.{fleet}.>", stream=TELEMETRY_STREAM)
    out: list[TelemetryAggregate] = []
    try:
        want = (await sub.consumer_info()).num_pending
        with anyio.fail_after(30):
            while len(out) < want:
                for msg in await sub.fetch(min(256, want - len(out)), timeout=5):
                    out.append(check_telemetry(msg))  # raises Rejected for what the cloud refuses
                    await msg.ack()
    finally:
        await sub.unsubscribe()
    return out


@pytest.mark.anyio
async def test_a_running_edge_rides_wall_clock_jumps_forward_and_back(
    tmp_path: Path, fleet: str, nats_server: EmbeddedServer, js: JetStreamContext
) -> None:
    if not FAKETIME_LIB.exists():
        pytest.skip(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y faketime")
    keys = Keys(tmp_path / "keys")
    port = free_port()
    log = tmp_path / "node.log"
    clock = tmp_path / "n1.faketime"
    args = edge_cli(nats_server.url, fleet, "n1", tmp_path / "data", keys.bundle().path, keys, port)
    args[args.index("200ms")] = "1s"
    async with aiohttp.ClientSession() as session:
        client = Client(session, f"http://127.0.0.1:{port}")
        proc = await start(args, log, client, env=faketime_env(clock))
        try:
            assert abs(await node_clock(client)) <= 2
            phases: dict[int, float] = {}
            for offset in (0, 300, -1800, 0):
                set_clock(clock, offset)
                seen = await node_clock(client)
                assert abs(seen - offset) <= 2, (offset, seen)  # the RUNNING process's clock moved
                phases[offset] = time.time()
                for i in range(3):  # traffic across a few windows at this offset
                    await client.burst(5, f"{offset}-{i}")
                    await anyio.sleep(0.6)
            with anyio.fail_after(60):
                while True:
                    aggs = await checked_telemetry(js, fleet)
                    if sum(a.count for a in aggs) >= client.answered:
                        break
                    await anyio.sleep(0.5)
            assert sum(a.count for a in aggs) == client.answered
            assert sorted(a.seq for a in aggs) == list(range(1, len(aggs) + 1)), "a seq gap"
            # Windows closed on the node's jumped clock: some end ~5 min ahead, some ~30 min behind.
            skews = [a.window_end.timestamp() - phases[0] for a in aggs]
            assert any(250 <= s <= 400 for s in skews), skews
            assert any(-1850 <= s <= -1700 for s in skews), skews
            assert "Traceback" not in log.read_text()
            await terminate(proc, log)
        finally:
            await kill(proc)
