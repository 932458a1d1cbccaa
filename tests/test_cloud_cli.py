"""The analyst commands and `slmops cloud` as real processes against a real server."""

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
from nats.js import JetStreamContext

from _nats import wait_until
from slmops.cloud.ingest.query import fleet_status
from slmops.cloud.service import CloudService
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

SLMOPS = [sys.executable, "-m", "slmops.cli"]


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
        await wait_until(lambda: svc.statistics()["events_published"] >= 1, 10, what="event out")
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
            "1",
        ],
        check=False,
    )
    assert watch.returncode == 0, watch.stderr.decode()
    event = json.loads(watch.stdout.decode().splitlines()[0])
    assert event["fleet"] == fleet
    assert (event["scope"], event["signal"], event["state"]) == ("fleet", "class_prior", "opened")
    status = await anyio.run_process(
        [*SLMOPS, "fleet", "status", "--nats", nats_server.url, "--fleet", fleet, "--json"], check=False
    )
    assert status.returncode == 0, status.stderr.decode()
    doc = json.loads(status.stdout.decode())
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


async def test_cloud_killed_mid_stream_restarts_without_losing_or_double_counting(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    """`slmops cloud` is SIGKILLed while aggregates stream in (small batches, so it dies
    between commits and acks); a restart on the same state counts every aggregate once."""
    fleet = "crash"
    config = tmp_path / "cloud.toml"
    config.write_text("ack_wait = 2.0\nlease_ttl = 2.0\nbatch_size = 8\nfetch_timeout = 0.2\n")
    argv = [*SLMOPS, "--log-json", "cloud", "--nats", private_server.url, "--state", str(tmp_path / "state"),
            "--fleet", fleet, "--no-rollouts", "--config", str(config)]  # fmt: skip
    rng = np.random.default_rng(21)
    aggs = [make_aggregate(fleet, node, s, 50 + s, rng) for s in range(1, 41) for node in ("a", "b", "c")]
    nc = await nats.connect(private_server.url)
    js = nc.jetstream()

    async def counted() -> int:
        nodes = await fleet_status(nc, fleet)
        return sum(n.aggregates for n in nodes)

    async def started(proc: anyio.abc.Process) -> None:
        assert proc.stderr is not None
        seen = b""
        while b"cloud_active" not in seen:
            seen += await proc.stderr.receive()

    try:
        with anyio.fail_after(90):
            async with await anyio.open_process(argv) as first:
                await started(first)
                for agg in aggs[:60]:
                    await publish(js, agg)
                await wait_until(_at_least(counted, 20), 20, what="some applied")
                first.kill()  # SIGKILL: no drain, no lease release, batches half done
                await first.wait()
            for agg in aggs[60:]:
                await publish(js, agg)
            async with await anyio.open_process(argv) as second:
                await started(second)
                await wait_until(_at_least(counted, len(aggs)), 40, what="all counted after restart")
                nodes = await fleet_status(nc, fleet)
                second.send_signal(signal.SIGTERM)
                assert await second.wait() == 0
    finally:
        await nc.close()
    assert sum(n.aggregates for n in nodes) == len(aggs)
    assert sum(n.inferences for n in nodes) == sum(a.count for a in aggs)
    assert all(n.seq_high == 40 and n.missing_seqs == 0 for n in nodes)


def _at_least(counter: Callable[[], Awaitable[int]], target: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await counter() >= target

    return check
