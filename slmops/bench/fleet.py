"""``slmops bench fleet --nodes N [--minutes M]``: one cloud against N simulated nodes.

Parts, all real: an embedded nats-server (``shared.server.EmbeddedServer``), the cloud
(``CloudService`` with default settings, in this process so its memory and drift rounds can be
read) and the nodes in a child process (``bench._simnodes``: edge-built aggregates on each
node's own subject with its own ``Nats-Msg-Id``, status reports, windows of 60 s compressed to
``period`` s of wall time, outages with reconnect bursts; many nodes per connection).

Phases and figures (times are wall-clock seconds on this machine; nothing passes or fails):

1. **steady** — ``minutes`` windows per node, ``60 / period`` times faster than real time.
   Ingest throughput (aggregates applied / s while traffic runs; ``headroom_steady`` = that /
   the real rate of one window per node per minute, a lower bound when the schedule, not the
   cloud, set the pace: then ``kept_up``, every lag below ``period``) and lag (a window's last
   PubAck → the cloud has applied everything sent so far; median and max).
2. **state** — cloud RSS growth per node (RSS after steady minus RSS once active, / N), SQLite
   state bytes per node, drift-round time (``DriftDetector._close_round``, timed by wrapping it),
   ``fleet status`` time: its first page (100 nodes), every node (``--json``), and the old
   read of every snapshot at once (``overview.fleet_view``).
3. **storm** — a ``storm`` share of the nodes reconnect at once, each on its own NATS
   connection (the number is reported), each with ``backlog`` buffered windows (60 = an hour);
   drain time = the first connect → the cloud has applied every one. Drain rate / the steady
   rate of one window per node per minute (``storm_drain_vs_steady_rate``); drift rounds
   closed and events (drift and ops) made during the drain (``storm_drift_rounds``,
   ``storm_events``).
4. **rollout** (``--rollout``) — after the state phase, version 2 is rolled out to every node in
   one stage of 100 % by the cloud's own rollout controller (default settings otherwise), while
   a child follows the assignments as nodes do (``_simnodes adopt``: a status reporting the
   version once its key names it; no bundle is fetched). Time from the start to every node
   assigned (phase ``installing``) and to every node reporting the version (phase ``soaking``:
   the stage "completes" in issue 18's terms, bundle delivery excepted), the rollout's KV header
   and parts in bytes beside the one value the old state would have been, the stage event's
   size; then the rollout is aborted and the time to restore every node's key is measured.
5. **baseline** — in the same run, bare JetStream: the child publishes the steady phase's
   messages back to back (other fleet id), and a bare durable pull consumer fetches and acks
   them (``bench.ingest._bare``: ``fetch(256)`` + one ack per message).

After all, every node's aggregate count is checked against what was sent (exactly once).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import nats
from anyio.streams.text import TextReceiveStream

from slmops.bench._fleet import MODEL, manifest_for
from slmops.bench.fleet_figures import DEFAULT_BACKLOG
from slmops.bench.ingest import _bare
from slmops.cloud.config import CloudConfig
from slmops.cloud.ingest.overview import (
    fleet_view,
    node_keys,
    read_views,
    server_time,
    stream_views,
)
from slmops.cloud.ingest.presence import forgotten
from slmops.cloud.service import CloudService, controller_tasks, tune_gc
from slmops.shared.messages import encode_json
from slmops.shared.names import MODELS_MANIFEST_BUCKET, manifest_key
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

__all__ = ["growth", "run_fleet"]


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (this process by default), from ``/proc``."""
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def _dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


async def _child(args: list[str], on_line: Callable[[dict[str, Any]], None], log: Path) -> None:
    """Run ``python -m slmops.bench._simnodes ARGS``; each JSON line of its stdout goes to
    ``on_line``; its stderr to ``log``. Raises ``RuntimeError`` when it fails."""
    cmd = [sys.executable, "-m", "slmops.bench._simnodes", *args]
    with open(log, "ab") as err:  # noqa: ASYNC230 -- a local log file, opened once per child
        async with await anyio.open_process(cmd, stdout=-1, stderr=err) as proc:
            assert proc.stdout is not None
            buf = ""
            async for chunk in TextReceiveStream(proc.stdout):
                buf += chunk
                *lines, buf = buf.split("\n")
                for line in lines:
                    if line.strip():
                        on_line(json.loads(line))
            code = await proc.wait()
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:]  # noqa: ASYNC240 -- once, on failure
        raise RuntimeError(f"simulated nodes ({args[0]}) exited {code}: {tail}")


class _Rounds:
    """Times each call of the detector's round close (the fleet pooling, BH and events)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def wrap(self, detector: Any) -> None:
        inner = detector._close_round  # private on purpose: the bench times what a round costs

        def timed(g: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(g)
            finally:
                self.seconds.append(time.perf_counter() - t0)

        detector._close_round = timed


def _events(svc: CloudService) -> int:
    """Drift and ops events the cloud has made so far (published or still queued)."""
    st = svc.statistics()
    return st.events_published + st.events_pending


async def _wait_applied(svc: CloudService, want: int, timeout: float) -> float:
    """Wait until the cloud has applied ``want`` aggregates; returns the time.time() then."""
    with anyio.fail_after(timeout):
        while svc.statistics().counters.get("aggregates", 0) < want:  # noqa: ASYNC110 -- polling a counter
            await anyio.sleep(0.05)
    return time.time()


async def run_fleet(
    *,
    nodes: int,
    minutes: int = 5,
    period: float = 2.0,
    conns: int = 16,
    storm: float = 0.1,
    backlog: int = DEFAULT_BACKLOG,
    workdir: Path | None = None,
    rollout: bool = False,
) -> dict[str, Any]:
    """One run at ``nodes`` nodes; returns the figures (module docstring; each one's meaning in
    ``fleet_figures.FIGURES``) as one dict."""
    tune_gc()
    fleet = "scale"
    tmp = tempfile.TemporaryDirectory(prefix="slmops-bench-fleet-") if workdir is None else None
    work = Path(tmp.name) if tmp else workdir
    assert work is not None
    work.mkdir(parents=True, exist_ok=True)
    log = work / "simnodes.log"
    state = str(work / "cloud")
    out: dict[str, Any] = {"nodes": nodes, "minutes": minutes, "period_s": period, "conns": conns}
    try:
        async with EmbeddedServer(store_dir=work / "js") as server:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await ensure_resources(js)
                kv = await js.key_value(MODELS_MANIFEST_BUCKET)
                await kv.put(
                    manifest_key(MODEL.name, MODEL.version, MODEL.variant), encode_json(manifest_for())
                )
                config = CloudConfig(nats_url=server.url, state_dir=state, fleets=[fleet])
                common = ["--url", server.url, "--fleet", fleet, "--nodes", str(nodes)]
                # --rollout: the rollout controller too, as ``slmops cloud`` runs it.
                extra = controller_tasks(config) if rollout else ()
                async with CloudService(config, extra_tasks=extra) as svc:
                    await svc.wait_active(60)
                    rounds = _Rounds()
                    assert svc.detector is not None
                    rounds.wrap(svc.detector)
                    rss0 = rss_bytes()
                    await _steady(svc, out, common, minutes, period, conns, log)
                    out["cloud_rss_bytes"] = rss1 = rss_bytes()
                    out["cloud_rss_per_node_bytes"] = round((rss1 - rss0) / nodes)
                    await _status(nc, svc, out, fleet, nodes)
                    out["sqlite_bytes"] = _dir_bytes(state)
                    out["sqlite_bytes_per_node"] = round(out["sqlite_bytes"] / nodes)
                    r = rounds.seconds
                    out["drift_rounds"] = len(r)
                    out["drift_round_s_median"] = round(statistics.median(r), 4) if r else None
                    out["drift_round_s_max"] = round(max(r), 4) if r else None
                    if rollout:
                        await _rollout(js, out, fleet, common, log)
                    if storm > 0 and backlog > 0:
                        before = (len(r), _events(svc))
                        await _storm(svc, out, common, minutes, storm, backlog, log)
                        # Rounds keyed by window time: at most one per window time drained.
                        out["storm_drift_rounds"] = len(rounds.seconds) - before[0]
                        out["storm_events"] = _events(svc) - before[1]
                    out["cloud_rss_after_storm_bytes"] = rss_bytes()
                    counts = {n.node: n.aggregates for n in svc.nodes.values()}
                    dup = svc.statistics().counters.get("duplicates", 0)
                out["exactly_once"] = _check(counts, nodes, minutes, storm, backlog)
                out["duplicates_dropped"] = dup
                await _baseline(js, out, server.url, nodes, minutes, conns, log)
            finally:
                await nc.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


async def _steady(
    svc: CloudService,
    out: dict[str, Any],
    common: list[str],
    minutes: int,
    period: float,
    conns: int,
    log: Path,
) -> None:
    windows: list[tuple[float, int]] = []
    lags: list[float] = []
    done = anyio.Event()

    async def watch() -> None:
        k = 0
        while not (done.is_set() and k >= len(windows)):
            if k < len(windows):
                t, sent = windows[k]
                lags.append(await _wait_applied(svc, sent, 600) - t)
                k += 1
            else:
                await anyio.sleep(0.05)

    last: dict[str, Any] = {}

    def on_line(d: dict[str, Any]) -> None:
        if d["event"] == "window":
            windows.append((d["t"], d["sent"]))
        else:
            last.update(d)

    t0 = time.time()
    base = svc.statistics().counters.get("aggregates", 0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await _child(
            ["steady", *common, "--minutes", str(minutes), "--period", str(period), "--conns", str(conns)],
            on_line,
            log,
        )
        done.set()
    elapsed = time.time() - t0
    applied = svc.statistics().counters.get("aggregates", 0) - base
    out["steady_sent"] = last.get("sent")
    out["steady_applied"] = applied
    out["steady_rate_per_s"] = round(applied / elapsed, 1)
    # One window per node per minute is the real rate; the phase ran 60/period times faster.
    out["compression"] = round(60.0 / period, 1)
    out["headroom_steady"] = round(applied / elapsed / (out["nodes"] / 60.0), 1)
    out["kept_up"] = bool(lags) and max(lags) < period
    out["lag_s_median"] = round(statistics.median(lags), 3) if lags else None
    out["lag_s_max"] = round(max(lags), 3) if lags else None


async def _status(nc: Any, svc: CloudService, out: dict[str, Any], fleet: str, nodes: int) -> None:
    # The snapshot writer runs every snapshot_interval: wait until every node's is in KV.
    t0 = time.perf_counter()
    with anyio.fail_after(600):
        while True:
            writer = svc._applier.snapshots if svc._applier is not None else None  # bench reads inside
            if writer is not None and not writer._dirty:
                break
            await anyio.sleep(0.1)
    await anyio.sleep(CloudConfig().snapshot_interval + 0.5)
    out["snapshot_catch_up_s"] = round(time.perf_counter() - t0, 2)
    # As `slmops fleet status` reads: the first page (table), then every node (--json).
    t0 = time.perf_counter()
    keys = await node_keys(nc, fleet)
    now, _ = await server_time(nc)
    gone = await forgotten(nc.jetstream(), fleet)
    first = await read_views(nc, keys[:100], now, gone)
    out["fleet_status_first_page_s"] = round(time.perf_counter() - t0, 3)
    out["fleet_status_first_page_rows"] = len(first)
    t0 = time.perf_counter()
    rows = 0
    async for _ in stream_views(nc, keys, now, gone):
        rows += 1
        if rows == 1:
            out["fleet_status_json_first_node_s"] = round(time.perf_counter() - t0, 3)
    out["fleet_status_json_all_s"] = round(time.perf_counter() - t0, 3)
    out["fleet_status_rows"] = rows
    # Before issue 18 the command read every snapshot before printing anything:
    t0 = time.perf_counter()
    await fleet_view(nc, fleet)
    out["fleet_status_read_all_at_once_s"] = round(time.perf_counter() - t0, 3)


async def _storm(
    svc: CloudService,
    out: dict[str, Any],
    common: list[str],
    minutes: int,
    share: float,
    backlog: int,
    log: Path,
) -> None:
    every = max(1, round(1 / share))
    members = len(range(0, int(common[common.index("--nodes") + 1]), every))
    want = svc.statistics().counters.get("aggregates", 0) + members * backlog
    info: dict[str, Any] = {}

    def on_line(d: dict[str, Any]) -> None:
        info[d["event"]] = d

    t0 = time.time()
    await _child(
        ["storm", *common, "--storm", str(share), "--backlog", str(backlog), "--from-seq", str(minutes)],
        on_line,
        log,
    )
    t_end = await _wait_applied(svc, want, 3600)
    out["storm_nodes"] = members
    out["storm_connections"] = info["connected"]["connections"]
    out["storm_connect_s"] = round(info["connected"]["seconds"], 2)
    out["storm_backlog_windows"] = backlog
    out["storm_aggregates"] = members * backlog
    out["storm_publish_s"] = round(info["done"]["seconds"], 2)
    out["storm_resent_for_want_of_puback"] = info["done"]["resent"]
    out["storm_drain_s"] = round(t_end - t0, 2)
    rate = members * backlog / (t_end - t0)
    out["storm_drain_rate_per_s"] = round(rate, 1)
    out["storm_drain_vs_steady_rate"] = round(rate / (out["nodes"] / 60.0), 2)


async def _rollout(js: Any, out: dict[str, Any], fleet: str, common: list[str], log: Path) -> None:
    from slmops.cloud.registry import Registry
    from slmops.cloud.rollout import RolloutConfig, RolloutStore, start_rollout
    from slmops.cloud.rollout.controller import EVENT_NODES
    from slmops.shared.kv import kv_values
    from slmops.shared.names import ROLLOUT_STREAM, ROLLOUTS_BUCKET, rollout_subject

    v2 = msgspec.structs.replace(MODEL, version=2)
    kv = await js.key_value(MODELS_MANIFEST_BUCKET)
    await kv.put(manifest_key(v2.name, 2, v2.variant), encode_json(manifest_for(v2)))
    registry, store = Registry(js), RolloutStore(js)
    await registry.assign(fleet, 1, model=MODEL.name)  # the fleet-wide key the rollout replaces
    ready = anyio.Event()

    def on_line(d: dict[str, Any]) -> None:
        if d["event"] == "ready":
            ready.set()

    async def phase_at(want: str, t0: float) -> float:
        with anyio.fail_after(1800):
            while True:
                got = await store.get(fleet, parts=False)
                if got is not None and got[0].phase == want:
                    return time.perf_counter() - t0
                if got is not None and not got[0].active and want != "done":
                    raise RuntimeError(f"rollout ended early: {got[0].status}: {got[0].reason}")
                await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(_child, ["adopt", *common, "--minutes", "30", "--version", "2"], on_line, log)
        with anyio.fail_after(120):
            await ready.wait()
        t0 = time.perf_counter()
        config = RolloutConfig(stages=[100])
        await start_rollout(js, registry, store, fleet=fleet, version=2, model=MODEL.name, config=config)
        out["rollout_assigned_all_s"] = round(await phase_at("installing", t0), 2)
        out["rollout_stage_installed_s"] = round(await phase_at("soaking", t0), 2)
        got = await store.get(fleet)
        assert got is not None
        state = got[0]
        out["rollout_nodes"] = len(state.nodes)
        rkv = await js.key_value(ROLLOUTS_BUCKET)
        out["rollout_header_bytes"] = len((await rkv.get(fleet)).value or b"")
        parts = await kv_values(js, ROLLOUTS_BUCKET, f"{fleet}.>", timeout=30)
        out["rollout_parts"] = len(parts)
        out["rollout_parts_bytes"] = sum(len(v) for v in parts.values())
        # What the state was before issue 18: every node inside the one value (KV's limit: 1 MiB).
        old = msgspec.to_builtins(state)
        old.update(v=1)
        for field in ("parts", "written"):  # fields the old format did not have
            old.pop(field)
        for entry in old["nodes"].values():
            entry.pop("part")
        out["rollout_single_value_bytes_old_format"] = len(msgspec.json.encode(old))
        last = await js.get_last_msg(ROLLOUT_STREAM, rollout_subject(fleet))
        out["rollout_stage_event_bytes"] = len(last.data or b"")
        out["rollout_stage_event_nodes_listed"] = min(len(state.nodes), EVENT_NODES)
        t1 = time.perf_counter()
        await store.command(fleet, "abort")
        out["rollout_abort_restored_all_s"] = round(await phase_at("done", t1), 2)
        tg.cancel_scope.cancel()  # the adopting child: its work is done


async def _baseline(
    js: Any, out: dict[str, Any], url: str, nodes: int, minutes: int, conns: int, log: Path
) -> None:
    info: dict[str, Any] = {}
    common = ["--url", url, "--fleet", "bare", "--nodes", str(nodes)]
    await _child(["bare", *common, "--minutes", str(minutes), "--conns", str(conns)], info.update, log)
    out["bare_publish_rate_per_s"] = round(info["sent"] / info["seconds"], 1)
    out["bare_fetch_ack_rate_per_s"] = round(await _bare(js, "bare", info["sent"]), 1)


def _check(counts: dict[str, int], nodes: int, minutes: int, share: float, backlog: int) -> bool:
    every = max(1, round(1 / share)) if share > 0 else 0
    for i in range(nodes):
        want = minutes + (backlog if every and i % every == 0 and backlog > 0 else 0)
        if counts.get(f"n{i:06d}", 0) != want:
            return False
    return len(counts) == nodes


#: Figures compared between runs at different N, and what "linear or better" means for each:
#: per-node figures should stay flat (growth ≈ 1), totals should grow at most like N.
GROWTH = (
    ("cloud_rss_per_node_bytes", "per node"),
    ("sqlite_bytes_per_node", "per node"),
    ("drift_round_s_median", "total"),
    ("fleet_status_first_page_s", "total"),
    ("fleet_status_json_all_s", "total"),
    ("lag_s_median", "total"),
    ("storm_drain_s", "total"),
    ("steady_rate_per_s", "total"),
)


def growth(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each figure's ratio between consecutive runs (sorted by nodes), beside the ratio of N."""
    rows = []
    runs = sorted(results, key=lambda r: r["nodes"])
    for a, b in itertools.pairwise(runs):
        n_ratio = b["nodes"] / a["nodes"]
        for key, kind in GROWTH:
            x, y = a.get(key), b.get(key)
            if not x or y is None:
                continue
            rows.append({"figure": key, "from_nodes": a["nodes"], "to_nodes": b["nodes"],
                         "nodes_ratio": n_ratio, "growth": round(y / x, 2), "kind": kind})  # fmt: skip
    return rows


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
