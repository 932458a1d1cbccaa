"""``slmops bench ingest``: cloud ingest throughput vs bare nats-py fetch+ack, same server, same run.

Project: ``CloudService`` consuming aggregates already in ``SLMOPS_TELEMETRY`` — batches of 4096
pulled by ``cloud.pull.PullBatches`` (the next one prefetched while this one is handled),
decode, check, dedupe by (node, seq), fleet state, drift detection on 6 signals, one SQLite
transaction (WAL, synchronous=FULL) and one ack (policy "all") per batch. A warm-up part of the
stream is consumed first, until the node baselines are learnt and the detector has calibrated
its thresholds (once per signal and window-size bucket, in a worker thread); then the service
restarts on the same state and the rest is timed from the moment it is active (consumer bound)
to the last aggregate applied.
Baseline: a bare durable pull consumer doing nats-py's ``fetch(256)`` + ``ack()`` on the same
number of identical messages, timed from its first fetch. For context the JSON also holds nats-py
at its best on the same messages — ``fetch(4096)`` and one ack per batch (policy "all") — and
the project's ratio to that (``bare_fetch_batch_ack_all``)."""

from __future__ import annotations

import tempfile
import time

import anyio
import nats
from nats.js import JetStreamContext
from nats.js import api as js_api

from slmops.bench._fleet import MODEL, SyntheticFleet, manifest_for
from slmops.cloud.config import CloudConfig, DriftConfig
from slmops.cloud.service import CloudService, ServiceStatistics, tune_gc
from slmops.shared.messages import encode_json, encode_telemetry
from slmops.shared.names import (
    MODELS_MANIFEST_BUCKET,
    TELEMETRY_STREAM,
    manifest_key,
    msg_id,
    telemetry_filter,
    telemetry_subject,
)
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

__all__ = ["run"]


async def _publish_all(js: JetStreamContext, items: list[tuple[str, bytes, str]]) -> None:
    chunk = 512
    for i in range(0, len(items), chunk):
        futs = [await js.publish_async(s, d, headers={"Nats-Msg-Id": m}) for s, d, m in items[i : i + chunk]]
        with anyio.fail_after(30):
            for f in futs:
                await f


def _payloads(synth: SyntheticFleet, windows: range) -> list[tuple[str, bytes, str]]:
    fleet, nodes = synth.fleet, len(synth.names)
    out = []
    for w in windows:
        for i in range(nodes):
            agg = synth.aggregate(i, w)
            out.append(
                (telemetry_subject(fleet, agg.node), encode_telemetry(agg), f"{fleet}/{msg_id(agg.node, w)}")
            )
    return out


async def _bare(
    js: JetStreamContext, fleet: str, total: int, *, batch: int = 256, ack_all: bool = False
) -> float:
    """Bare nats-py: ``fetch(batch)`` and an ``ack()`` per message, or one per batch with
    ack policy "all"."""
    config = js_api.ConsumerConfig(
        ack_policy=js_api.AckPolicy.ALL if ack_all else js_api.AckPolicy.EXPLICIT,
        max_ack_pending=max(4 * batch, 1024),
    )
    sub = await js.pull_subscribe(
        telemetry_filter(fleet), durable=f"bare-{fleet}", stream=TELEMETRY_STREAM, config=config
    )
    got = 0
    t0 = time.perf_counter()  # from the first fetch, like the project's timing
    while got < total:
        msgs = await sub.fetch(batch, timeout=5)
        if ack_all:
            await msgs[-1].ack()
        else:
            for m in msgs:
                await m.ack()
        got += len(msgs)
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    return total / elapsed


async def _project(
    url: str,
    js: JetStreamContext,
    fleet: str,
    state: str,
    warm_msgs: list[tuple[str, bytes, str]],
    timed_msgs: list[tuple[str, bytes, str]],
    quick: bool,
) -> tuple[float, ServiceStatistics]:
    warm, total = len(warm_msgs), len(warm_msgs) + len(timed_msgs)
    config = CloudConfig(
        nats_url=url,
        state_dir=state,
        fleets=[fleet],
        snapshot_interval=1.0,
        # Quick: coarser calibrations, for speed only (they are made before the timed part).
        drift=DriftConfig(calibration_windows=50_000) if quick else DriftConfig(),
    )

    def applied(svc: CloudService) -> int:
        return sum(n.aggregates for n in svc.nodes.values())

    def calibrating(svc: CloudService) -> bool:
        det = svc.detector
        return det is None or det.statistics().calibrations_queued > 0

    await _publish_all(js, warm_msgs)
    async with CloudService(config) as svc:
        await svc.wait_active(30)
        with anyio.fail_after(600):
            while applied(svc) < warm or calibrating(svc):  # noqa: ASYNC110 -- polling counters
                await anyio.sleep(0.01)
    await _publish_all(js, timed_msgs)  # while no cloud runs: a backlog to work through
    async with CloudService(config) as svc:
        await svc.wait_active(30)  # active = consumer bound, its first fetch under way
        t0 = time.perf_counter()
        with anyio.fail_after(600):
            while applied(svc) < total:  # noqa: ASYNC110 -- as above
                await anyio.sleep(0.01)  # coarse on purpose: polling costs the service CPU
        elapsed = time.perf_counter() - t0
        stats = svc.statistics()
    return (total - warm) / elapsed, stats


async def run(quick: bool = False) -> list[dict[str, object]]:
    tune_gc()  # as `slmops cloud` does; the bare baseline runs in the same process with it
    nodes = 20 if quick else 200
    # Past the node baselines (20 tested windows), so every calibration is made before timing.
    warm_windows = 24
    windows = 44 if quick else 224  # 40,000 timed: ten batches of 4096
    async with EmbeddedServer() as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_resources(js)
            kv = await js.key_value(MODELS_MANIFEST_BUCKET)
            await kv.put(manifest_key(MODEL.name, MODEL.version, MODEL.variant), encode_json(manifest_for()))
            # Stationary traffic: the same nodes (class mixes, window sizes) throughout.
            project_fleet = SyntheticFleet("bench_p", nodes, seed=1)
            warm_msgs = _payloads(project_fleet, range(1, warm_windows + 1))
            timed_msgs = _payloads(project_fleet, range(warm_windows + 1, windows + 1))
            bare_msgs = _payloads(
                SyntheticFleet("bench_b", nodes, seed=1), range(warm_windows + 1, windows + 1)
            )
            await _publish_all(js, bare_msgs)
            baseline = await _bare(js, "bench_b", len(bare_msgs))
            # For context (not the ratio): nats-py's fetch at its best, batched like the project.
            batched_msgs = _payloads(
                SyntheticFleet("bench_c", nodes, seed=1), range(warm_windows + 1, windows + 1)
            )
            await _publish_all(js, batched_msgs)
            batch = CloudConfig().batch_size
            batched = await _bare(js, "bench_c", len(batched_msgs), batch=batch, ack_all=True)
            with tempfile.TemporaryDirectory(prefix="slmops-bench-ingest-") as state:
                project, stats = await _project(
                    server.url, js, "bench_p", state, warm_msgs, timed_msgs, quick
                )
        finally:
            await nc.close()
    return [
        {
            "scenario": "ingest_throughput",
            "project": round(project, 1),
            "baseline": round(baseline, 1),
            "ratio": round(project / baseline, 3),
            "units": "aggregates/s",
            "aggregates_timed": len(bare_msgs),
            "nodes": nodes,
            "batch_size": CloudConfig().batch_size,
            "baseline_batch": 256,
            "bare_fetch_batch_ack_all": round(batched, 1),
            "ratio_to_bare_fetch_batch_ack_all": round(project / batched, 3),
            "signals": 6,
            "sqlite": "WAL, synchronous=FULL, one transaction per batch",
            "counters": stats.counters,
        }
    ]
