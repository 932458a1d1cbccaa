"""``slmops demo``: the whole job on one machine, told as a story driven by events.

Each phase ends when its condition holds, not when a clock says so, and each has a generous
bound (``DemoOptions.phase_timeout``); a phase that runs out names what it waited for:

1. build the default model — the factory's MiniLM topic classifier, its ``int8-l3`` variant
   (7 ms a call here, so five nodes fit on two cores) — or take it from the factory's cache,
   keyed by its inputs (``cloud.factory.cache``);
2. start the cloud and the nodes — until every node serves;
3. steady state — until the cloud has counted traffic from every node;
4. one node loses its link (a real TCP cut) — until it buffers what it cannot send;
5. the class mix shifts on the other nodes — until the cloud opens a drift event;
6. the cloud recalibrates from aggregates alone and rolls the new version out — until the
   rollout's first stage passed its gates (canary against control in the same period);
7. the offline node reconnects — until it drained its buffer, runs the new version and the
   rollout completed;
8. drain — until every node's inferences served equal those the cloud counted.

``duration`` sets the pace: the timed parts (the steady state, the offline node's time before
the shift) are fractions of it; the phases that wait for an event end when it happens.

Everything runs for real: the embedded nats-server, the cloud and every edge node are separate
processes; a node's link is cut with a TCP proxy; traffic is HTTP to each node's local API.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

from slmops.demo.fleet import Fleet, NodeProc, slmops_cmd
from slmops.demo.report import StoryFailed, rollout_failure, summary
from slmops.demo.state import PHASES, Story
from slmops.demo.traffic import Traffic, raw_event_bytes
from slmops.shared.bundle import load_private_key, new_keypair, read_bundle
from slmops.shared.logging import get_logger
from slmops.shared.messages import DriftEvent, RolloutEvent, decode_json
from slmops.shared.names import drift_subject, rollout_subject, telemetry_filter
from slmops.shared.server import EmbeddedServer

__all__ = ["PHASES", "DemoOptions", "Story", "run_demo"]

log = get_logger("slmops.demo")
FLEET = "demo"

#: The story's phases, numbered 1..8 in this order (the live view and the one-line-per-phase
#: output number them the same way).


@dataclass
class DemoOptions:
    nodes: int = 5
    #: The pace: the steady state lasts 15% of it, the offline node's time before the shift 10%.
    duration: float = 90.0
    seed: int = 0
    #: Per-node inferences per second while traffic runs.
    rate: float = 16.0
    window: str = "3s"
    min_count: int = 5
    #: Keep every log, store and database here (must not exist); default: a temporary dir,
    #: removed after a run that passed and kept (and named) after one that failed.
    workdir: Path | None = None
    #: Bound of each phase that waits for an event (building the model: ``build_timeout``).
    phase_timeout: float = 240.0
    build_timeout: float = 900.0
    #: Where the factory keeps built models (default: its user cache, ``~/.cache/slmops/models``).
    cache_dir: Path | None = None
    #: "minilm" (the default model) or "ngram" (the small hashed n-gram model, built in seconds).
    arch: str = "minilm"
    #: After the story, a second fleet of two nodes serving chat (``demo.generative``).
    generative: bool = False
    #: The generation bundle it serves and the key that signed it (default: SmolLM2, cached).
    generative_model: Path | None = None
    generative_trust: Path | None = None


Update = Callable[[Story, Fleet | None], None]


class _Teller:
    """Moves the story from phase to phase and tells whoever listens."""

    def __init__(
        self, story: Story, update: Update, on_phase: Callable[[Story], None], words: dict[str, Any]
    ):
        self.story = story
        self.update = update
        self.on_phase = on_phase
        self.words = words
        self.fleet: Fleet | None = None

    def enter(self, number: int) -> None:
        s = self.story
        now = time.monotonic()
        if s.number:
            s.done.append((s.number, s.phase, round(now - s.phase_started, 1)))
        s.number, s.phase, s.phase_started = number, PHASES[number - 1].format(**self.words), now
        self.on_phase(s)
        self.update(s, self.fleet)

    async def until(
        self, what: str, cond: Callable[[], Awaitable[bool]], *, timeout: float, at_least: float = 0.0
    ) -> None:
        """Wait until ``cond()`` holds (and ``at_least`` seconds of the phase passed); after
        ``timeout`` seconds the story fails naming the phase and ``what``."""
        with anyio.move_on_after(timeout):
            while True:
                if time.monotonic() - self.story.phase_started >= at_least and await cond():
                    return
                self.update(self.story, self.fleet)
                await anyio.sleep(0.5)
        s = self.story
        raise StoryFailed(
            phase=f"{s.number}/{s.total} {s.phase}", what=f"{what}: not within {timeout:.0f} s", detail=""
        )


async def run_demo(
    opts: DemoOptions,
    *,
    on_update: Update | None = None,
    on_phase: Callable[[Story], None] | None = None,
) -> dict[str, Any]:
    """Run the story; returns the summary (``ok`` says whether every check held). ``on_phase``
    is called once as each phase starts."""
    story = Story()
    update = on_update or (lambda s, f: None)
    if opts.workdir is None:
        root, temporary = Path(tempfile.mkdtemp(prefix="slmops-demo-")), True
    else:
        root, temporary = opts.workdir, False
        root.mkdir(parents=True, exist_ok=False)
    story.workdir = root
    result: dict[str, Any] = {}
    try:
        server = EmbeddedServer(store_dir=root / "js")
        await server.start_async()
        fleet = Fleet(root, server.url, server.port, FLEET)
        try:
            result = await _story(opts, story, update, on_phase or (lambda s: None), root, server, fleet)
            if opts.generative:
                result = await _generative(opts, root, server, result)
        finally:
            story.phase = "stopping"
            update(story, fleet)
            await fleet.stop()
            await server.stop_async()
    finally:
        if temporary and result.get("ok"):
            shutil.rmtree(root, ignore_errors=True)
            result["workdir"] = None
    return result


async def _story(
    opts: DemoOptions,
    story: Story,
    update: Update,
    on_phase: Callable[[Story], None],
    root: Path,
    server: EmbeddedServer,
    fleet: Fleet,
) -> dict[str, Any]:
    from slmops.cloud.factory.corpus import load_topics, split_topics  # cloud extra: the corpus
    from slmops.cloud.ingest.query import fleet_status
    from slmops.cloud.rollout.cohort import hash_point

    # The node that loses its link is the last a rollout's cohort reaches (and the shift spares
    # it, so the shift stays visible while it is offline): the first stage runs on online nodes.
    names = [f"node-{i}" for i in range(opts.nodes)]
    offline_name = max(names, key=lambda n: (hash_point(FLEET, n), n))
    shifted_names = [n for n in names if n != offline_name]
    teller = _Teller(story, update, on_phase, {"nodes": opts.nodes, "offline": offline_name,
                                                "shifted": len(shifted_names)})  # fmt: skip
    teller.fleet = fleet
    nodes: list[NodeProc] = []
    counted: dict[str, dict[str, Any]] = {}
    try:
        # -- 1. the model -------------------------------------------------------------------
        teller.enter(1)
        with anyio.fail_after(opts.build_timeout):
            model = await anyio.to_thread.run_sync(lambda: _model(opts, root))
        story.model_cached = not model.built
        bundle = read_bundle(model.bundle)
        ref = bundle.manifest.reference
        where = "from the cache" if story.model_cached else "built"
        story.notes.append(f"model v1: {opts.arch} {bundle.manifest.variant} {where} ({model.bundle})")
        if ref is not None and ref.accuracy is not None:
            story.notes.append(f"model v1 held-out accuracy {ref.accuracy:.3f}")
        await _run_ok([*slmops_cmd(), "models", "push", str(model.bundle), "--nats", server.url,
                       "--trust", str(model.public_key)])  # fmt: skip
        await _run_ok([*slmops_cmd(), "models", "assign", "--nats", server.url, "--fleet", FLEET,
                       "--version", "1", "--model", bundle.manifest.name])  # fmt: skip

        # -- 2. cloud and nodes ---------------------------------------------------------------
        teller.enter(2)
        cloud_config = root / "cloud.toml"
        # Demo-sized rollouts: two stages, 10 s of soak, gates judged on 200 inferences, 120 s
        # for a node to install (MiniLM under load: download, verify, smoke tests). The
        # first stage takes one node of up to five, so that with three or more nodes one that is
        # online stays outside it as the control group (the offline one cannot be one). The
        # drift gate allows 0.3: the recalibrated version's reference holds priors estimated
        # from a few 2 s windows, off from the true mix by up to ~0.15 in total variation (seen
        # 0.09-0.15 in demo runs); a version that answers one class is off by far more.
        cloud_config.write_text(
            "[drift]\nmin_count = 40\n\n[rollout]\nstages = [20, 100]\nsoak_s = 10.0\n"
            "install_timeout_s = 120.0\nmin_samples = 200\nmax_drift_increase = 0.3\n"
        )
        await fleet.start_cloud(
            ["--key", str(model.private_key), "--recalibrate", "auto", "--config", str(cloud_config)]
        )
        for i in range(opts.nodes):
            nodes.append(
                await fleet.start_node(
                    i,
                    model=model.bundle,
                    trust=model.public_key,
                    window=opts.window,
                    min_count=opts.min_count,
                )
            )
        with anyio.fail_after(opts.phase_timeout):
            for n in nodes:
                await fleet.wait_ready(n, timeout=opts.phase_timeout)

        split = split_topics(load_topics(), seed=opts.seed)
        traffic = Traffic(split.held_out_texts, split.held_out_labels, split.labels, seed=opts.seed)
        favoured = traffic.favoured(["sports", "money"])
        shift_on = anyio.Event()
        offline = next(n for n in nodes if n.name == offline_name)

        def mix_for(node: NodeProc) -> Callable[[], dict[int, float]]:
            def mix() -> dict[int, float]:
                if shift_on.is_set() and node.name in shifted_names:
                    return traffic.shifted(favoured, 4.0)
                return traffic.natural()

            return mix

        nc = await nats.connect(server.url, name="slmops-demo-observer")
        try:
            await _observe(nc, story)

            async def cloud_counts() -> dict[str, int]:
                return {s.node: s.inferences for s in await fleet_status(nc, FLEET)}

            def rollout_state(kind: str) -> list[RolloutEvent]:
                return [e for e in story.rollout_events if e.state == kind]

            def check_rollout() -> None:
                bad = [e for e in story.rollout_events if e.state in ("rolled_back", "aborted")]
                if bad:
                    raise rollout_failure(story, bad[0], fleet.cloud_log)

            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for n in nodes:
                    tg.start_soon(_drive, fleet, n, traffic, mix_for(n), opts.rate, story, stop)
                tg.start_soon(_watch_health, fleet, nodes, offline, story, update)

                # -- 3. steady state ----------------------------------------------------------
                teller.enter(3)

                async def all_counted() -> bool:
                    c = await cloud_counts()
                    return all(c.get(n.name, 0) > 0 for n in nodes)

                await teller.until("the cloud counting traffic from every node", all_counted,
                                   timeout=opts.phase_timeout, at_least=0.15 * opts.duration)  # fmt: skip

                # -- 4. the link cut ----------------------------------------------------------
                teller.enter(4)
                await offline.proxy.cut()

                async def buffering() -> bool:
                    return offline.health.get("link") != "online" and int(offline.health.get("outbox", 0)) > 0

                await teller.until(f"{offline.name} buffering while offline", buffering,
                                   timeout=opts.phase_timeout, at_least=0.10 * opts.duration)  # fmt: skip

                # -- 5. the shift -------------------------------------------------------------
                teller.enter(5)
                shift_on.set()
                shifted_at = datetime.now(UTC)

                async def drift_opened() -> bool:
                    # The class mix's event, opened after the shift (a busy machine can open a
                    # latency event earlier; that is not the story's shift).
                    return any(
                        e.state == "opened" and e.signal == "class_prior" and e.time >= shifted_at
                        for e in story.drift_events
                    )

                await teller.until("a class-mix drift event", drift_opened, timeout=opts.phase_timeout)

                # -- 6. recalibration and the first stage -------------------------------------
                teller.enter(6)

                async def first_stage() -> bool:
                    check_rollout()
                    return bool(rollout_state("stage_passed") or rollout_state("completed"))

                await teller.until("a recalibrated version passing the rollout's first stage", first_stage,
                                   timeout=opts.phase_timeout)  # fmt: skip

                # -- 7. reconnect -------------------------------------------------------------
                teller.enter(7)
                await offline.proxy.restore()
                new_version = rollout_state("started")[0].version

                async def back_and_refreshed() -> bool:
                    check_rollout()
                    model_now = offline.health.get("model") or {}
                    return (
                        bool(rollout_state("completed"))
                        and offline.health.get("outbox") == 0
                        and model_now.get("version") == new_version
                    )

                await teller.until(f"{offline.name} drained, on v{new_version}, and the rollout completed",
                                   back_and_refreshed, timeout=opts.phase_timeout)  # fmt: skip

                # -- 8. drain -------------------------------------------------------------------
                teller.enter(8)
                stop.set()
                await anyio.sleep(0.5)
                tg.cancel_scope.cancel()

            # A last burst of k inferences per node so every node's final window reaches k and
            # is published (k-anonymity holds smaller windows back until more traffic comes).
            for n in nodes:
                await _send(
                    fleet, n, [t for t, _ in traffic.sample(traffic.natural(), opts.min_count)], story
                )

            async def every_inference_counted() -> bool:
                for n in nodes:
                    with contextlib.suppress(OSError, TimeoutError, anyio.EndOfStream):
                        await fleet.health(n)
                c = await cloud_counts()
                return all(c.get(n.name) == n.served and n.health.get("outbox") == 0 for n in nodes)

            await teller.until("every node's served inferences counted by the cloud", every_inference_counted,
                               timeout=opts.phase_timeout)  # fmt: skip
        finally:
            await nc.close()
        counted = await _counted(server.url)  # the public view: `slmops fleet status --json`
        story.done.append((story.number, story.phase, round(time.monotonic() - story.phase_started, 1)))
    except* StoryFailed as group:  # raised in a task group's body: it may come wrapped
        first = group.exceptions[0]
        story.failure = first.as_dict() if isinstance(first, StoryFailed) else {"what": str(first)}
        log.warning("demo_failed", **story.failure)
    return summary(opts.nodes, story, nodes, counted)


async def _generative(
    opts: DemoOptions, root: Path, server: EmbeddedServer, result: dict[str, Any]
) -> dict[str, Any]:
    """The ``--generative`` epilogue; a skip (its reason in the summary) keeps the story's verdict."""
    from slmops.demo.generative import GenerativeOutcome, resolve_model, run_generative

    model = await anyio.to_thread.run_sync(
        lambda: resolve_model(opts.generative_model, opts.generative_trust, opts.cache_dir)
    )
    if isinstance(model, str):
        outcome = GenerativeOutcome(skipped=model)
    else:
        outcome = await run_generative(root, server.url, server.port, model, timeout=opts.phase_timeout)
    return {
        **result,
        "generative": outcome.as_dict(),
        "ok": bool(result.get("ok")) and (outcome.ok or bool(outcome.skipped)),
    }


@dataclass(frozen=True)
class _Model:
    bundle: Path
    private_key: Path
    public_key: Path
    built: bool


#: The variant the demo's nodes serve (see the module docstring).
DEMO_VARIANT = "int8-l3"


def _model(opts: DemoOptions, root: Path) -> _Model:
    """The default model from the factory's cache (built there when missing)."""
    if opts.arch == "ngram":
        return _ngram(opts, root / "model")
    from slmops.cloud.factory.cache import cached_minilm

    m = cached_minilm(seed=opts.seed, root=opts.cache_dir)
    return _Model(m.bundles[DEMO_VARIANT], m.key_path, m.pub_path, built=not m.hit)


def _ngram(opts: DemoOptions, root: Path) -> _Model:
    from slmops.cloud.factory.build import build

    key_path, pub_path = new_keypair(root / "keys", "fleet")
    report = build(root / "bundle", load_private_key(key_path), seed=opts.seed)
    return _Model(report.bundle.path, key_path, pub_path, built=True)


async def _observe(nc: Any, story: Story) -> None:
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


async def _watch_health(
    fleet: Fleet, nodes: list[NodeProc], offline: NodeProc, story: Story, update: Update
) -> None:
    while True:
        for n in nodes:
            with contextlib.suppress(OSError, TimeoutError, anyio.EndOfStream):
                await fleet.health(n)
        if offline.proxy.is_cut:
            story.offline_outbox_peak = max(story.offline_outbox_peak, int(offline.health.get("outbox", 0)))
        update(story, fleet)
        await anyio.sleep(0.5)


async def _counted(nats_url: str) -> dict[str, dict[str, Any]]:
    """The cloud's view of each node, through the public `slmops fleet status --json`."""
    proc = await anyio.run_process(
        [*slmops_cmd(), "fleet", "status", "--nats", nats_url, "--fleet", FLEET, "--json"], check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fleet status failed: {proc.stderr.decode(errors='replace')[-500:]}")
    try:
        # One JSON document, written node by node over several lines (`--json` streams).
        doc = json.loads(proc.stdout)
    except ValueError as exc:
        tail = proc.stdout[-300:]
        raise RuntimeError(f"fleet status --json printed no JSON document ({exc}): {tail!r}") from exc
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


async def _run_ok(cmd: list[str]) -> None:
    proc = await anyio.run_process(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[3:6])} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-800:]}"
        )
