"""Issue 14: the cloud's read-only HTTP face against a real nats-server and the real
service — Prometheus ``/metrics`` scraped and parsed, the JSON API, the bearer token and the
loopback rule, and the web console in a real headless Chromium (from the distribution's
packages): the page shows the running fleet's nodes and a drift event after a shift, with no
console errors; its screenshot is kept as a test artefact (``$SLMOPS_ARTEFACTS`` or the test's
temporary directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from html import unescape
from pathlib import Path

import aiohttp
import anyio
import numpy as np
import pytest
import yaml
from _cloud_util import (
    MODEL,
    PRIOR,
    cloud_config,
    drift_events,
    make_aggregate,
    make_manifest,
    publish,
    put_manifest,
)
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from _nats import wait_until
from slmops.cloud.config import CloudConfig
from slmops.cloud.service import CloudService
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

TOKEN = "a-test-token-of-32-characters-xx"


def _config(url: str, tmp: Path, fleet: str, **kw: object) -> CloudConfig:
    import msgspec

    base = msgspec.to_builtins(cloud_config(url, tmp, fleet))
    return msgspec.convert({**base, "http": "127.0.0.1:0", **kw}, CloudConfig)


async def _run_fleet(js: JetStreamContext, svc: CloudService, fleet: str, nodes: list[str]) -> None:
    """10 rounds at the reference, then 8 shifted: a baseline and a fleet drift event."""
    rng = np.random.default_rng(21)
    for seq in range(1, 19):
        for node in nodes:
            prior = PRIOR if seq <= 10 else [0.2, 0.3, 0.5]
            await publish(js, make_aggregate(fleet, node, seq, 300, rng, prior=prior))
    await wait_until(
        lambda: sum(n.aggregates for n in svc.nodes.values()) == 18 * len(nodes), 30, what="applied"
    )

    async def opened() -> bool:
        return any(e.kind == "drift" and e.state == "opened" for e in await drift_events(js, fleet))

    await wait_until(opened, 20, what="a drift event")


def test_the_console_refuses_a_public_address_without_a_token() -> None:
    with pytest.raises(ValueError, match="not a loopback address: set http_token"):
        CloudConfig(http="0.0.0.0:8480")
    with pytest.raises(ValueError, match="HOST:PORT"):
        CloudConfig(http="8480")
    assert CloudConfig(http="0.0.0.0:8480", http_token=TOKEN).http_token == TOKEN
    assert CloudConfig(http="[::1]:8480").http == "[::1]:8480"


async def test_metrics_are_scraped_and_say_what_the_cloud_did(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    await put_manifest(js, make_manifest())
    nodes = [f"{fleet}-n{i}" for i in range(3)]
    async with CloudService(_config(nats_server.url, tmp_path, fleet, http_token=TOKEN)) as svc:
        await svc.wait_active(20)
        await _run_fleet(js, svc, fleet, nodes)
        assert svc.http_address is not None
        host, port = svc.http_address
        await anyio.sleep(svc.metrics.interval + 1)  # one refresh of the round-trip figures
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}:{port}/metrics") as r:
                assert r.status == 401
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"http://{host}:{port}/metrics", headers=headers) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
            async with http.get(f"http://{host}:{port}/api/openapi.json?token={TOKEN}") as r:
                doc = await r.json()
            async with http.get(f"http://{host}:{port}/api/fleet", headers=headers) as r:
                fleet_doc = await r.json()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("slmops_cloud_aggregates_total", ())] == 18 * 3
    assert samples[("slmops_cloud_active", (("holder", svc.holder),))] == 1
    assert samples[("slmops_cloud_nodes_online", (("fleet", fleet),))] == 3
    assert (
        samples[
            (
                "slmops_cloud_drift_events_open",
                (("fleet", fleet), ("scope", "fleet"), ("signal", "class_prior")),
            )
        ]
        == 1
    )
    logged = (("kind", "drift"), ("signal", "class_prior"), ("state", "opened"))
    assert samples[("slmops_cloud_drift_events_total", logged)] == 1
    assert (
        samples[
            (
                "slmops_cloud_drift_events_total",
                (("kind", "baseline"), ("signal", "baseline"), ("state", "opened")),
            )
        ]
        == 1
    )
    assert samples[("slmops_cloud_ingest_lag_messages", ())] == 0
    # The ingest batch-latency histogram: every batch handled is one observation.
    batches = samples[("slmops_cloud_ingest_batch_seconds_count", ())]
    assert batches >= 1
    assert samples[("slmops_cloud_ingest_batch_seconds_bucket", (("le", "+Inf"),))] == batches
    assert 0 < samples[("slmops_cloud_ingest_batch_seconds_sum", ())] < 60 * batches
    assert samples[("slmops_cloud_rollouts", (("status", "running"),))] == 0
    assert {"/api/fleet", "/api/drift", "/api/plot.svg", "/api/rollouts", "/metrics"} <= set(doc["paths"])
    # Every metric the shipped dashboard and alert rules query is one the cloud exports.
    exported = {name for name, _labels in samples}
    root = Path(__file__).resolve().parent.parent / "deploy"
    dashboard = json.loads((root / "grafana" / "slmops-cloud.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((root / "prometheus" / "slmops-alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    queried = {m for e in exprs for m in re.findall(r"slmops_[a-z_]+", e)}
    assert len(queried) >= 10
    assert queried <= exported, queried - exported
    assert sorted(n["node"] for n in fleet_doc["nodes"]) == nodes
    assert all(n["online"] for n in fleet_doc["nodes"])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def _lineage(js: JetStreamContext, fleet: str, event_id: str) -> str:
    """What the cloud stores when it recalibrates for ``event_id`` and the rollout of the new
    version fails: v2 in the registry (parent v1), the loop's proposal naming the event, and
    the rollout's started / rolled_back events. Returns the rollout id."""
    import msgspec

    from slmops.cloud.recalibration.loop import Proposal, _proposal_key
    from slmops.shared.jetstream import ensure_kv
    from slmops.shared.messages import ModelRef, RolloutEvent, encode_json
    from slmops.shared.names import LOOP_BUCKET, rollout_subject

    v2 = make_manifest(ModelRef(name=MODEL.name, version=2, variant=MODEL.variant))
    notes = "label-shift recalibration of version 1: prior ratios a 0.67x, b 1.20x, c 2.50x"
    await put_manifest(js, msgspec.structs.replace(v2, parent_version=1, notes=notes))
    now = datetime.now(UTC)
    proposal = Proposal(
        fleet=fleet, model=MODEL.name, parent_version=1, version=2, variants=[MODEL.variant],
        priors={}, event_id=event_id, policy="auto", outcome="rollout_started", time=now,
    )  # fmt: skip
    kv = await ensure_kv(js, LOOP_BUCKET)
    await kv.put(_proposal_key(fleet, MODEL.name, 1), msgspec.json.encode(proposal))
    rid = f"{fleet}-r1"
    for state, reason in (
        ("started", f"recalibration for drift event {event_id}"),
        ("rolled_back", "gate failed: error rate 0.09 > 0.02"),
    ):
        e = RolloutEvent(
            rollout=rid, fleet=fleet, model=MODEL.name, version=2, previous_version=1,
            state=state, reason=reason, time=now,
        )  # fmt: skip
        await js.publish(rollout_subject(fleet), encode_json(e))
    return rid


async def test_the_console_in_a_headless_browser_shows_the_fleet_and_its_drift_event(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium: .ci/run installs the Debian package chromium")
        pytest.skip("no chromium on this machine (apt-get install chromium); CI installs it")
    await put_manifest(js, make_manifest())
    nodes = [f"{fleet}-n{i}" for i in range(3)]
    artefacts = Path(os.environ.get("SLMOPS_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "console.png"
    async with CloudService(_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        await _run_fleet(js, svc, fleet, nodes)
        event = next(e for e in await drift_events(js, fleet) if e.kind == "drift" and e.state == "opened")
        rollout = await _lineage(js, fleet, event.id)
        assert svc.http_address is not None
        host, port = svc.http_address
        url = f"http://{host}:{port}/"
        common = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=15000", "--window-size=1400,1800",
        ]  # fmt: skip
        dom = await anyio.run_process([*common, "--dump-dom", url], check=False)
        await anyio.run_process([*common, f"--screenshot={shot}", url], check=False)
    html = dom.stdout.decode()
    log = dom.stderr.decode()
    assert 'data-loaded="1"' in html, log[-3000:]
    for node in nodes:
        assert f"<td>{node}</td>" in html
    assert f"<td>{event.id}</td>" in html
    assert "api/plot.svg?group=" in html
    # Lineage: v2 recalibrated from v1 because of this event, pushed to the fleet, rolled back.
    lineage = html[html.index('id="lineage"') :]
    rows = re.findall(r"<tr>(.*?)</tr>", lineage.split("</table>", 1)[0])
    cells = [[unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)] for r in rows]
    assert [c[:6] for c in cells if c and c[3] == "recalibration"] == [
        [MODEL.name, "v1", "v2", "recalibration", fleet, event.id]
    ], cells
    assert [c[1:8] for c in cells if c and c[3] == "rollout"] == [
        ["v1", "v2", "rollout", fleet, f"recalibration for drift event {event.id}", rollout, "rolled_back"]
    ], cells
    assert [c[1:9] for c in cells if c and c[3] == "rollback"] == [
        ["v2", "v1", "rollback", fleet, "–", rollout, "rolled_back", "gate failed: error rate 0.09 > 0.02"]
    ], cells
    errors = [
        line for line in log.splitlines() if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)
    ]
    assert errors == [], errors
    assert shot.exists()
    assert shot.stat().st_size > 10_000
    print(f"\nconsole screenshot: {shot}")


async def test_drift_events_reach_a_webhook_in_order_despite_failures(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """A webhook that answers 503 to its first two requests still gets every event of the
    fleet once, in the stream's order (retried with backoff, default settings)."""
    from aiohttp import web

    got: list[dict[str, object]] = []
    failures = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal failures
        if failures < 2:
            failures += 1
            return web.Response(status=503)
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        await put_manifest(js, make_manifest())
        nodes = [f"{fleet}-n{i}" for i in range(3)]
        cfg = _config(nats_server.url, tmp_path, fleet, webhook_url=f"http://127.0.0.1:{port}/hook")
        async with CloudService(cfg) as svc:
            await svc.wait_active(20)
            await _run_fleet(js, svc, fleet, nodes)
            stored = [e.id for e in await drift_events(js, fleet)]
            await wait_until(lambda: len(got) >= len(stored), 30, what="every event at the webhook")
    finally:
        await runner.cleanup()
    assert failures == 2
    assert [e["id"] for e in got] == stored
    with pytest.raises(ValueError, match="webhook_url must be an http"):
        CloudConfig(webhook_url="ftp://x")
