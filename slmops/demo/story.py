"""``slmops demo``: the whole job on one machine, told as a story with checks.

1. steady state; 2. one node loses its link and keeps serving, buffering; 3. a shift hits part
of the fleet and drift events appear; 4. the cloud recalibrates and rolls the new version out;
5. the offline node reconnects, drains its buffer and refreshes its model; 6. a summary: per
node, inferences served and counted by the cloud (equal), its model version; drift events;
versions; bytes sent against raw per-event telemetry.

Everything runs for real: the embedded nats-server, the cloud and every edge node are separate
processes; a node's link is cut with a TCP proxy; traffic is HTTP to each node's local API.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

from slmops.demo.fleet import Fleet, NodeProc, slmops_cmd
from slmops.demo.traffic import Traffic, raw_event_bytes
from slmops.shared.bundle import load_private_key, new_keypair
from slmops.shared.logging import get_logger
from slmops.shared.messages import DriftEvent, RolloutEvent, decode_json
from slmops.shared.names import drift_subject, rollout_subject, telemetry_filter
from slmops.shared.server import EmbeddedServer

__all__ = ["DemoOptions", "run_demo"]

log = get_logger("slmops.demo")
FLEET = "demo"


@dataclass
class DemoOptions:
    nodes: int = 5
    duration: float = 90.0
    seed: int = 7
    #: Per-node inferences per second while traffic runs.
    rate: float = 40.0
    window: str = "2s"
    min_count: int = 5
    #: Keep every log, store and database here (must not exist); default: a temporary dir.
    workdir: Path | None = None


@dataclass
class Story:
    """What happened, for the live view and the summary."""

    phase: str = "starting"
    started: float = field(default_factory=time.monotonic)
    drift_events: list[DriftEvent] = field(default_factory=list)
    rollout_events: list[RolloutEvent] = field(default_factory=list)
    bytes_sent: int = 0
    messages_sent: int = 0
    offline_outbox_peak: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


async def _counted(nats_url: str) -> dict[str, dict[str, Any]]:
    """The cloud's view of each node, through the public `slmops fleet status --json`."""
    proc = await anyio.run_process(
        [*slmops_cmd(), "fleet", "status", "--nats", nats_url, "--fleet", FLEET, "--json"], check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fleet status failed: {proc.stderr.decode(errors='replace')[-500:]}")
    doc = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return {n["node"]: n for n in doc.get("nodes", [])}


async def _send(fleet: Fleet, node: NodeProc, texts: list[str], story: Story) -> None:
    try:
        preds = await fleet.predict(node, texts)
    except (OSError, anyio.EndOfStream, TimeoutError) as exc:
        node.failed += len(texts)
        story.notes.append(f"{node.name}: request failed: {type(exc).__name__}")
        return
    for text, pred in zip(texts, preds, strict=False):
        node.raw_bytes += raw_event_bytes(FLEET, node.name, text, pred)


async def _drive(
    fleet: Fleet,
    node: NodeProc,
    traffic: Traffic,
    mix: Callable[[], dict[int, float]],
    rate: float,
    story: Story,
    stop: anyio.Event,
) -> None:
    batch = 4
    interval = batch / rate
    next_at = time.monotonic()
    while not stop.is_set():
        await _send(fleet, node, [t for t, _ in traffic.sample(mix(), batch)], story)
        next_at += interval
        await anyio.sleep(max(0.0, next_at - time.monotonic()))


async def run_demo(
    opts: DemoOptions, *, on_update: Callable[[Story, Fleet | None], None] | None = None
) -> dict[str, Any]:
    """Run the story; returns the summary (``ok`` says whether every check held)."""
    story = Story()
    update = on_update or (lambda s, f: None)
    with contextlib.ExitStack() as stack:
        if opts.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slmops-demo-")))
        else:
            root = opts.workdir
            root.mkdir(parents=True, exist_ok=False)
        server = EmbeddedServer(store_dir=root / "js")
        await server.start_async()
        fleet = Fleet(root, server.url, server.port, FLEET)
        try:
            return await _story(opts, story, update, root, server, fleet)
        finally:
            story.phase = "stopping"
            update(story, fleet)
            await fleet.stop()
            await server.stop_async()


async def _story(
    opts: DemoOptions,
    story: Story,
    update: Callable[[Story, Fleet | None], None],
    root: Path,
    server: EmbeddedServer,
    fleet: Fleet,
) -> dict[str, Any]:
    from slmops.cloud.factory.build import build
    from slmops.cloud.factory.corpus import load_topics, split_topics  # cloud extra: the model and its corpus

    # -- set-up: key, model v1, registry, cloud, nodes ------------------------------------------
    story.phase = "building the model"
    update(story, fleet)
    key_path, pub_path = new_keypair(root / "keys", "fleet")
    report = await anyio.to_thread.run_sync(
        lambda: build(root / "bundles" / "v1", load_private_key(key_path), seed=opts.seed)
    )
    bundle_dir = report.bundle.path
    story.notes.append(f"model v1 held-out accuracy {report.accuracy:.3f}")
    await _run_ok(
        [*slmops_cmd(), "models", "push", str(bundle_dir), "--nats", server.url, "--trust", str(pub_path)]
    )
    await _run_ok(
        [
            *slmops_cmd(),
            "models",
            "assign",
            "--nats",
            server.url,
            "--fleet",
            FLEET,
            "--version",
            "1",
            "--model",
            report.bundle.manifest.name,
        ]
    )

    story.phase = "starting cloud and nodes"
    update(story, fleet)
    cloud_config = root / "cloud.toml"
    # Demo-sized rollouts: two stages, seconds of soak, gates judged on 100 inferences.
    cloud_config.write_text(
        "[drift]\nmin_count = 40\n\n[rollout]\nstages = [40, 100]\nsoak_s = 4.0\n"
        "install_timeout_s = 20.0\nmin_samples = 100\n"
    )
    await fleet.start_cloud(["--key", str(key_path), "--recalibrate", "auto", "--config", str(cloud_config)])
    nodes = [
        await fleet.start_node(
            i, model=bundle_dir, trust=pub_path, window=opts.window, min_count=opts.min_count
        )
        for i in range(opts.nodes)
    ]
    for n in nodes:
        await fleet.wait_ready(n)

    split = split_topics(load_topics(), seed=opts.seed)
    traffic = Traffic(split.held_out_texts, split.held_out_labels, split.labels, seed=opts.seed)
    favoured = traffic.favoured(["sports", "money"])
    # The shift hits every node but the last (which also loses its link): part of the fleet.
    shifted_nodes = set(range(opts.nodes - 1))
    shift_on = anyio.Event()

    def mix_for(i: int) -> Callable[[], dict[int, float]]:
        def mix() -> dict[int, float]:
            if shift_on.is_set() and i in shifted_nodes:
                return traffic.shifted(favoured, 4.0)
            return traffic.natural()

        return mix

    mixes = {i: mix_for(i) for i in range(opts.nodes)}

    nc = await nats.connect(server.url, name="slmops-demo-observer")
    try:

        async def on_telemetry(msg: Any) -> None:
            story.bytes_sent += len(msg.data)
            story.messages_sent += 1

        async def on_drift(msg: Any) -> None:
            try:
                story.drift_events.append(decode_json(msg.data, DriftEvent))
            except msgspec.DecodeError:
                story.notes.append("undecodable drift event")

        async def on_rollout(msg: Any) -> None:
            try:
                story.rollout_events.append(decode_json(msg.data, RolloutEvent))
            except msgspec.DecodeError:
                story.notes.append("undecodable rollout event")

        await nc.subscribe(telemetry_filter(FLEET), cb=on_telemetry)
        await nc.subscribe(drift_subject(FLEET), cb=on_drift)
        await nc.subscribe(rollout_subject(FLEET), cb=on_rollout)

        traffic_time = max(30.0, opts.duration - 25.0)
        stop = anyio.Event()
        offline = nodes[-1]  # the one node the shift does not hit: the shift stays visible online
        async with anyio.create_task_group() as tg:
            for i, n in enumerate(nodes):
                tg.start_soon(_drive, fleet, n, traffic, mixes[i], opts.rate, story, stop)

            async def watch_health() -> None:
                while True:
                    for n in nodes:
                        with contextlib.suppress(OSError, TimeoutError, anyio.EndOfStream):
                            await fleet.health(n)
                    if offline.proxy.is_cut:
                        story.offline_outbox_peak = max(
                            story.offline_outbox_peak, int(offline.health.get("outbox", 0))
                        )
                    update(story, fleet)
                    await anyio.sleep(0.5)

            tg.start_soon(watch_health)
            t0 = time.monotonic()

            async def at(frac: float) -> None:
                await anyio.sleep(max(0.0, t0 + frac * traffic_time - time.monotonic()))

            story.phase = "1. steady state"
            await at(0.15)
            story.phase = f"2. {offline.name} loses its link, keeps serving and buffering"
            await offline.proxy.cut()
            await at(0.25)
            story.phase = f"3. traffic shifts on {len(shifted_nodes)} of {opts.nodes} nodes"
            shift_on.set()
            await at(0.80)
            story.phase = f"5. {offline.name} reconnects: drains its buffer, refreshes its model"
            await offline.proxy.restore()
            await at(1.0)
            stop.set()
            story.phase = "6. draining: last windows close, outboxes empty"
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()

        # A last burst of k inferences per node so every node's final window reaches k and is
        # published (k-anonymity holds smaller windows back until more traffic comes).
        for n in nodes:
            await _send(fleet, n, [t for t, _ in traffic.sample(traffic.natural(), opts.min_count)], story)
        counted = await _wait_counted(fleet, nodes, server.url, story, update)
    finally:
        await nc.close()
    return _summary(opts, story, fleet, nodes, counted)


async def _run_ok(cmd: list[str]) -> None:
    proc = await anyio.run_process(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[3:6])} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-800:]}"
        )


async def _wait_counted(
    fleet: Fleet, nodes: list[NodeProc], url: str, story: Story, update: Callable[[Story, Fleet | None], None]
) -> dict[str, dict[str, Any]]:
    counted: dict[str, dict[str, Any]] = {}
    with anyio.move_on_after(30):
        while True:
            for n in nodes:
                await fleet.health(n)
            update(story, fleet)
            counted = await _counted(url)
            if all(counted.get(n.name, {}).get("inferences") == n.served for n in nodes) and all(
                n.health.get("outbox") == 0 for n in nodes
            ):
                break
            await anyio.sleep(1.0)
    return counted


def _summary(
    opts: DemoOptions, story: Story, fleet: Fleet, nodes: list[NodeProc], counted: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for n in nodes:
        model = n.health.get("model") or {}
        rows.append(
            {
                "node": n.name,
                "served": n.served,
                "counted": counted.get(n.name, {}).get("inferences"),
                "model_version": model.get("version"),
                "failed_requests": n.failed,
            }
        )
    versions: list[int] = sorted({int(r["model_version"]) for r in rows if r["model_version"] is not None})
    opened = [e for e in story.drift_events if e.state == "opened"]
    story.checks["served_equals_counted"] = all(r["counted"] == r["served"] and r["served"] > 0 for r in rows)
    story.checks["no_failed_requests"] = all(r["failed_requests"] == 0 for r in rows)
    story.checks["offline_node_buffered"] = story.offline_outbox_peak > 0
    story.checks["outboxes_drained"] = all(n.health.get("outbox") == 0 for n in nodes)
    story.checks["drift_event_opened"] = bool(opened)
    story.checks["new_version_rolled_out"] = (
        bool(versions) and max(versions) > 1 and all(r["model_version"] == max(versions) for r in rows)
    )
    if not story.checks["new_version_rolled_out"]:
        story.missing.append("recalibration + rollout: not every node ended on a version newer than 1")
    return {
        "ok": all(story.checks.values()),
        "nodes": rows,
        "drift_events": len(story.drift_events),
        "drift_opened": len(opened),
        "drift_event_example": msgspec.to_builtins(opened[0]) if opened else None,
        "rollout_events": len(story.rollout_events),
        "versions": versions,
        "bytes_sent": story.bytes_sent,
        "bytes_raw_equivalent": sum(n.raw_bytes for n in nodes),
        "checks": story.checks,
        "missing": story.missing,
        "notes": story.notes[-20:],
        "seconds": round(story.elapsed(), 1),
        "nodes_requested": opts.nodes,
    }
