"""The analyst commands and `slmops cloud` against a real server: as real processes where the
process is the subject (signals, exit codes, start-up refusals) or needs the main thread, else
in process."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import nats
import numpy as np
import pytest
from _cloud_util import PRIOR, cloud_config, make_aggregate, make_manifest, publish, put_manifest
from click.testing import CliRunner, Result
from nats.js import JetStreamContext

from _nats import wait_until
from slmops.cli import main
from slmops.cloud.ingest.query import fleet_status
from slmops.cloud.service import CloudService
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

SLMOPS = [sys.executable, "-m", "slmops.cli"]


async def _in_process(*argv: str) -> Result:
    return await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["--log-level", "error", *argv]))


async def test_drift_watch_json_and_fleet_status_json_show_what_the_cloud_found(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """After a fleet-wide shift, `drift watch --all --json` replays the opened event and
    `fleet status --json` lists each node with its exact inference count."""
    rng = np.random.default_rng(11)
    await put_manifest(js, make_manifest())
    nodes = [f"{fleet}-a", f"{fleet}-b"]
    sent: dict[str, int] = dict.fromkeys(nodes, 0)
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        for seq in range(1, 15):
            for node in nodes:
                agg = make_aggregate(
                    fleet, node, seq, 400, rng, prior=PRIOR if seq <= 6 else [0.25, 0.3, 0.45]
                )
                sent[node] += agg.count
                await publish(js, agg)
        await wait_until(lambda: sum(n.aggregates for n in svc.nodes.values()) == 28, 20, what="all applied")
        await wait_until(lambda: svc.statistics().events_published >= 2, 10, what="events out")
        await anyio.sleep(0.3)  # one snapshot interval (0.1 s) and then some
    watch = await anyio.run_process(
        [
            *SLMOPS,
            "drift",
            "watch",
            "--nats",
            nats_server.url,
            "--fleet",
            fleet,
            "--all",
            "--json",
            "--limit",
            "2",
        ],
        check=False,
    )  # a process: `drift watch` sets signal handlers, which only the main thread may (asyncio)
    assert watch.returncode == 0, watch.stderr.decode()
    baseline, event = (json.loads(line) for line in watch.stdout.decode().splitlines()[:2])
    assert (baseline["kind"], baseline["reference"]) == ("baseline", "baseline:auto-1")
    assert event["fleet"] == fleet
    assert (event["scope"], event["signal"], event["state"]) == ("fleet", "class_prior", "opened")
    assert event["reference"] == "baseline:auto-1"
    # In process: the command's output is under test, not its start-up (~3-5 s under load).
    status = await _in_process("fleet", "status", "--nats", nats_server.url, "--fleet", fleet, "--json")
    assert status.exit_code == 0, status.stderr
    doc = json.loads(status.stdout)
    got = {n["node"]: n for n in doc["nodes"]}
    assert set(got) == set(nodes)
    for node in nodes:
        assert got[node]["inferences"] == sent[node]
        assert got[node]["model_version"] == 1
        assert got[node]["last_seen"] is not None


async def test_drift_watch_follows_live_and_exits_0_on_ctrl_c(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str
) -> None:
    """`drift watch` (table output) keeps following until SIGINT, then exits with code 0."""
    with anyio.fail_after(30):
        async with await anyio.open_process(
            [*SLMOPS, "drift", "watch", "--nats", nats_server.url, "--fleet", fleet]
        ) as proc:
            assert proc.stdout is not None
            header = await proc.stdout.receive()
            assert b"signal" in header
            proc.send_signal(signal.SIGINT)
            code = await proc.wait()
    assert code == 0


async def test_cloud_command_runs_until_sigterm_and_exits_0(
    nats_server: EmbeddedServer, fleet: str, tmp_path: Path
) -> None:
    """`slmops cloud` becomes active, then stops cleanly on SIGTERM."""
    with anyio.fail_after(60):
        async with await anyio.open_process(
            [
                *SLMOPS,
                "--log-json",
                "cloud",
                "--nats",
                nats_server.url,
                "--state",
                str(tmp_path),
                "--fleet",
                fleet,
                "--no-rollouts",
            ]
        ) as proc:
            assert proc.stderr is not None
            seen = b""
            while b"cloud_active" not in seen:
                seen += await proc.stderr.receive()
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
    assert code == 0
    assert (tmp_path / "cloud.sqlite3").exists()


async def test_cloud_command_rejects_a_bad_fleet_id_naming_it() -> None:
    """A fleet id that cannot be a subject token is refused before connecting."""
    proc = await anyio.run_process([*SLMOPS, "cloud", "--fleet", "bad.fleet"], check=False)
    assert proc.returncode == 2
    assert b"bad.fleet" in proc.stderr


async def test_cloud_killed_twice_under_load_loses_nothing_with_default_settings(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Issue 13 fault 1. `slmops cloud` with DEFAULT settings (ack wait 30 s, lease 10 s,
    batches of 4096, fetch timeout 1 s) is SIGKILLed twice while a node keeps publishing at
    10/s; each restart counts every window once: published == counted, 0 missing.

    This replaces a test that hid the fault: it set ack_wait = lease_ttl = 2 s and published
    every message before the restart, so the dead instance's unacked batch was redelivered
    before the new instance acked anything. Under ack policy "all" with the default 30 s ack
    wait, the new instance's first ack covered that batch and it was never redelivered."""
    fleet = "crash"
    argv = [*SLMOPS, "--log-json", "cloud", "--nats", private_server.url, "--state", str(tmp_path / "state"),
            "--fleet", fleet, "--no-rollouts"]  # fmt: skip
    rng = np.random.default_rng(21)
    aggs = [make_aggregate(fleet, "a", s, 50 + s, rng) for s in range(1, 201)]
    nc = await nats.connect(private_server.url)
    js = nc.jetstream()
    published = 0

    logs = [tmp_path / f"cloud{i}.log" for i in range(3)]

    async def cloud(i: int) -> anyio.abc.Process:
        # Logs to a file: a pipe nobody reads would fill up and stall the process.
        with logs[i].open("wb") as err:
            return await anyio.open_process(argv, stdout=None, stderr=err)

    async def started(i: int) -> None:
        await wait_until(lambda: b"cloud_active" in logs[i].read_bytes(), 30, what=f"cloud {i} active")

    async def publish_until(n: int) -> None:
        nonlocal published
        while published < n:
            await publish(js, aggs[published])
            published += 1
            await anyio.sleep(0.1)

    async def counted() -> int:
        return sum(n.aggregates for n in await fleet_status(nc, fleet))

    try:
        with anyio.fail_after(110):
            async with anyio.create_task_group() as tg:
                async with await cloud(0) as first:
                    await started(0)
                    await publish_until(60)
                    first.kill()  # SIGKILL: a fetched, unapplied batch stays unacked
                    await first.wait()
                await publish_until(80)
                async with await cloud(1) as second:
                    await started(1)
                    tg.start_soon(publish_until, 200)  # keeps sending through the next kill
                    await wait_until(lambda: published >= 130, 30, what="publisher past 130")
                    second.kill()
                    await second.wait()
                await anyio.sleep(1)
                async with await cloud(2) as third:
                    await started(2)
                    await wait_until(lambda: published == 200, 40, what="all published")
                    await wait_until(_at_least(counted, 200), 30, what="all counted")
                    nodes = await fleet_status(nc, fleet)
                    third.send_signal(signal.SIGTERM)
                    assert await third.wait() == 0
    finally:
        await nc.close()
    (node,) = nodes
    assert node.aggregates == 200
    assert node.inferences == sum(a.count for a in aggs)
    assert node.seq_high == 200
    assert node.missing_seqs == 0
    assert node.gaps == 0


def _at_least(counter: Callable[[], Awaitable[int]], target: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await counter() >= target

    return check
