"""`slmops status`, `fleet status`'s online column (by the server's clock) and `fleet forget`,
in process (a real process where the reader's faked clock needs one) against a real
nats-server and a real cloud service (default settings but the pace: batch, fetch linger,
snapshot interval)."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from _cloud_util import cloud_config as _paced_config
from _cloud_util import make_aggregate, make_manifest, publish, put_manifest
from click.testing import CliRunner
from nats.js import JetStreamContext

from _nats import wait_until
from slmops.bench.chaos import FAKETIME_LIB
from slmops.cli import main
from slmops.cloud.ingest.snapshot import NodeSnapshot
from slmops.cloud.service import CloudService
from slmops.shared.messages import encode_telemetry
from slmops.shared.names import FLEET_BUCKET, telemetry_subject
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

SLMOPS = [sys.executable, "-m", "slmops.cli"]


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`slmops ARGS`: exit code, stdout, stderr. With ``env`` (libfaketime's LD_PRELOAD) a real
    process; else in process (a thread: the command runs its own event loop), as `slmops` would
    (each subprocess paid ~2-5 s of start-up under load; the commands' work is under test)."""
    if env is not None:
        r = await anyio.run_process([*SLMOPS, *args], check=False, env={**os.environ, **env})
        return r.returncode, r.stdout.decode(), r.stderr.decode()
    res = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["--log-level", "error", *args]))
    return res.exit_code, res.stdout, res.stderr


async def _status_json(url: str, fleet: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    code, out, err = await _cli("fleet", "status", "--nats", url, "--fleet", fleet, "--json", env=env)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def _old_snapshot(fleet: str, node: str, minutes: float) -> NodeSnapshot:
    """A node the cloud last heard ``minutes`` ago (as it wrote it then)."""
    seen = datetime.now(UTC) - timedelta(minutes=minutes)
    return msgspec.convert(
        {"node": node, "fleet": fleet, "model": "kw", "model_version": 1, "variant": "fp32",
         "last_seen": seen.isoformat(), "last_window_end": None, "inferences": 5, "errors": 0,
         "windows": 1, "aggregates": 1, "duplicates": 0, "late": 0, "seq_high": 1, "missing_seqs": 0,
         "missing_ranges": [], "gaps": 0, "abandoned_seqs": 0, "dropped_inferences": 0,
         "dropped_aggregates": 0, "outbox_depth": 0, "served": 5, "status_event": None,
         "status_time": None, "last_error": None, "device": None, "arch": None, "cores": None,
         "memory_mb": None},
        NodeSnapshot,
    )  # fmt: skip


async def test_fleet_status_judges_online_by_the_server_clock_not_the_readers(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """A node the server heard from just now is online, one last heard 10 minutes ago is
    offline; a reader whose own clock is two hours ahead (libfaketime) sees the same."""
    rng = np.random.default_rng(3)
    await put_manifest(js, make_manifest())
    async with CloudService(_paced_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        await publish(js, make_aggregate(fleet, "fresh", 1, 50, rng))
        await wait_until(lambda: (fleet, "fresh") in svc.nodes, 20, what="applied")
        await anyio.sleep(0.3)  # a snapshot interval and then some
    kv = await js.key_value(FLEET_BUCKET)
    await kv.put(f"{fleet}.stale", msgspec.json.encode(_old_snapshot(fleet, "stale", 10)))

    doc = await _status_json(nats_server.url, fleet)
    assert doc["clock"] == "server"
    assert {n["node"]: n["online"] for n in doc["nodes"]} == {"fresh": True, "stale": False}
    code, table, _ = await _cli("fleet", "status", "--nats", nats_server.url, "--fleet", fleet)
    assert code == 0
    rows = {line.split()[1]: line.split()[2] for line in table.splitlines()[1:]}
    assert rows == {"fresh": "online", "stale": "offline"}

    if not FAKETIME_LIB.exists():
        pytest.skip(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y faketime")
    ahead = {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+2h", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    skewed = await _status_json(nats_server.url, fleet, env=ahead)
    assert {n["node"]: n["online"] for n in skewed["nodes"]} == {"fresh": True, "stale": False}


async def test_a_forgotten_node_is_hidden_then_reappears_counted_exactly_once(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """`fleet forget` hides a node but the cloud keeps its dedupe state: when it comes back
    and re-sends windows the cloud already counted (after the server's duplicate window, so
    only the cloud can tell) plus new ones, it reappears with each inference counted once."""
    rng = np.random.default_rng(5)
    await put_manifest(js, make_manifest())
    aggs = [make_aggregate(fleet, "old", seq, 40 + seq, rng) for seq in range(1, 7)]
    async with CloudService(_paced_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        for agg in aggs[:3]:
            await publish(js, agg)
        await publish(js, make_aggregate(fleet, "keep", 1, 30, rng))
        await wait_until(lambda: sum(n.aggregates for n in svc.nodes.values()) == 4, 20, what="applied")
        await anyio.sleep(0.3)

        code, _, err = await _cli(
            "fleet", "forget", "--nats", nats_server.url, "--fleet", fleet, "--node", "old"
        )
        assert code == 1
        assert "is online" in err
        assert "--force" in err
        code, _, err = await _cli(
            "fleet", "forget", "--nats", nats_server.url, "--fleet", fleet, "--node", "nope"
        )
        assert code == 1
        assert "no node 'nope'" in err
        code, out, err = await _cli(
            "fleet", "forget", "--nats", nats_server.url, "--fleet", fleet, "--node", "old", "--force"
        )
        assert code == 0, err
        assert "forgot" in out
        doc = await _status_json(nats_server.url, fleet)
        assert [n["node"] for n in doc["nodes"]] == ["keep"]
        code, out, _ = await _cli("status", "--nats", nats_server.url, "--fleet", fleet, "--json")
        assert code == 0
        assert json.loads(out)["fleets"][fleet]["nodes"] == 1

        # It comes back: seqs 2-3 again (no Nats-Msg-Id: as after the server's window), then 4-6.
        for agg in aggs[1:3]:
            await js.publish(telemetry_subject(fleet, "old"), encode_telemetry(agg))
        for agg in aggs[3:]:
            await publish(js, agg)
        node = svc.nodes[(fleet, "old")]
        await wait_until(lambda: node.aggregates + node.duplicates >= 8, 20, what="re-sent applied")
        await anyio.sleep(0.3)
    doc = await _status_json(nats_server.url, fleet)
    got = {n["node"]: n for n in doc["nodes"]}
    assert set(got) == {"old", "keep"}
    assert got["old"]["inferences"] == sum(a.count for a in aggs)
    assert got["old"]["duplicates"] == 2
    assert got["old"]["seq_high"] == 6


async def test_status_names_the_lease_holder_assignments_drift_and_rollouts(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """`slmops status --json` while a cloud is active: NATS reachable, the instance holding
    the lease, the fleet's nodes online, its assignment, its open drift event."""
    from _cloud_util import PRIOR

    rng = np.random.default_rng(11)
    manifest = make_manifest()
    await put_manifest(js, manifest)
    async with CloudService(_paced_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        for seq in range(1, 15):
            for node in ("a", "b"):
                prior = PRIOR if seq <= 6 else [0.25, 0.3, 0.45]
                await publish(js, make_aggregate(fleet, node, seq, 400, rng, prior=prior))
        await wait_until(lambda: sum(n.aggregates for n in svc.nodes.values()) == 28, 20, what="applied")
        await wait_until(lambda: svc.statistics().events_published >= 2, 10, what="events out")
        from slmops.shared.messages import Assignment, encode_json
        from slmops.shared.names import ASSIGNMENTS_BUCKET, assignment_key

        kv = await js.key_value(ASSIGNMENTS_BUCKET)
        a = Assignment(fleet=fleet, model="kw", version=1, variant="fp32", assigned_at=datetime.now(UTC))
        await kv.put(assignment_key(fleet), encode_json(a))
        await anyio.sleep(0.3)
        code, out, err = await _cli("status", "--nats", nats_server.url, "--fleet", fleet, "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["nats"]["reachable"] is True
        assert svc.holder in doc["cloud"]["leases"].values()
        f = doc["fleets"][fleet]
        assert (f["nodes"], f["online"]) == (2, 2)
        assert [(x["model"], x["version"], x["node"]) for x in f["assigned"]] == [("kw", 1, None)]
        assert [e["signal"] for e in f["open_drift"]] == ["class_prior"]
        assert f["rollouts"] == []
        code, text, _ = await _cli("status", "--nats", nats_server.url, "--fleet", fleet)
        assert code == 0
        assert f"cloud    {svc.holder} holds lease" in text
        assert f"fleet    {fleet}: 2 of 2 nodes online" in text
        assert "drift open class_prior (fleet, kw v1" in text


async def test_status_says_plainly_when_nats_is_unreachable() -> None:
    from _nats import free_port

    url = f"nats://alice:s3cret@127.0.0.1:{free_port()}"  # the password never printed
    code, out, err = await _cli("status", "--nats", url, "--json")
    assert code == 1
    assert json.loads(out)["nats"]["reachable"] is False
    assert err.startswith("Error: ")
    assert len(err.strip().splitlines()) == 1
    code, out2, err2 = await _cli("status", "--nats", url)
    assert code == 1
    assert "unreachable" in out2
    assert not any("s3cret" in text for text in (out, err, out2, err2))


async def test_read_commands_create_nothing_on_the_server(private_server: EmbeddedServer) -> None:
    """Every read command (`status`, `fleet status`, `rollout status/list`, `models list/show`,
    `fleet config show/history`, `audit`, `keys list`) on a server slmops never used: each
    answers (nothing there yet) and leaves it as it was, no stream and no bucket made. Old
    code: `status` provisioned every stream and bucket, reading rollouts created
    ``slmops_rollouts``, and `models list`, `fleet config show/history`, `audit` and `keys
    list` provisioned everything."""
    import nats

    url = private_server.url
    expected: list[tuple[tuple[str, ...], int, str]] = [
        (("status", "--json"), 0, '"fleets": {}'),
        (("fleet", "status", "--json"), 0, '"nodes": []'),
        (("fleet", "status"), 0, "no nodes: has the cloud service run"),
        (("fleet", "status"), 0, "no nodes: has the cloud service run"),
        (("rollout", "status", "--json"), 0, "[]"),
        (("rollout", "list"), 0, "no rollouts"),
        (("models", "list"), 0, "no models in the registry"),
        (("models", "show", "--model", "topic", "--version", "1"), 1, "version 1 is not in the registry"),
        (("fleet", "config", "show", "--fleet", "f1"), 0, "no configuration pushed"),
        (("fleet", "config", "history", "--fleet", "f1", "--json"), 0, ""),
        (("audit", "--json"), 0, ""),
        (("keys", "list"), 1, "no key list in KV slmops_keys yet"),
    ]
    nc = await nats.connect(url)
    try:
        for args, want_code, says in expected:
            code, out, err = await _cli(*args, "--nats", url)
            assert (code, says in out + err) == (want_code, True), (args, code, out, err)
            if not says:
                assert out == "", (args, out)  # nothing to list
            made = [s.config.name for s in await nc.jetstream().streams_info()]
            assert made == [], (args, made)
    finally:
        await nc.close()


async def test_a_forgotten_node_leaves_the_console_and_the_metrics_until_it_sends_again(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """After `fleet forget`, the cloud's ``/api/fleet`` (what the console lists) and
    ``slmops_cloud_nodes`` / ``slmops_cloud_nodes_online`` leave the node out, as `fleet
    status` does; when it sends again it is back in all of them. Old code: the console and
    /metrics still counted it."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    from slmops.cloud.config import CloudConfig

    rng = np.random.default_rng(7)
    await put_manifest(js, make_manifest())
    config = msgspec.convert(
        {**msgspec.to_builtins(_paced_config(nats_server.url, tmp_path, fleet)), "http": "127.0.0.1:0"},
        CloudConfig,
    )
    async with CloudService(config) as svc, aiohttp.ClientSession() as http:
        await svc.wait_active(20)
        assert svc.http_address is not None
        base = "http://{}:{}".format(*svc.http_address)

        async def shown() -> tuple[list[str], float, float]:
            async with http.get(f"{base}/api/fleet?fleet={fleet}") as r:
                listed = [n["node"] for n in (await r.json())["nodes"]]
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            samples = {
                s.name: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.labels.get("fleet") == fleet
            }
            return listed, samples.get("slmops_cloud_nodes", 0), samples.get("slmops_cloud_nodes_online", 0)

        async def shows(want: tuple[list[str], float, float]) -> bool:
            return await shown() == want

        await publish(js, make_aggregate(fleet, "old", 1, 40, rng))
        await publish(js, make_aggregate(fleet, "keep", 1, 30, rng))
        await wait_until(lambda: shows((["keep", "old"], 2, 2)), 20, what="both nodes shown")

        async def recorded() -> bool:  # what `fleet forget` reads: the snapshots in KV (~1 s behind)
            code, out, _ = await _cli(
                "fleet", "status", "--nats", nats_server.url, "--fleet", fleet, "--json"
            )
            return code == 0 and {n["node"] for n in json.loads(out)["nodes"]} == {"keep", "old"}

        await wait_until(recorded, 20, what="both nodes' snapshots in KV")
        code, _, err = await _cli(
            "fleet", "forget", "--nats", nats_server.url, "--fleet", fleet, "--node", "old", "--force"
        )
        assert code == 0, err
        await wait_until(lambda: shows((["keep"], 1, 1)), 20, what="the forgotten node left out")
        await publish(js, make_aggregate(fleet, "old", 2, 40, rng))  # it comes back
        await wait_until(lambda: shows((["keep", "old"], 2, 2)), 20, what="the node shown again")
