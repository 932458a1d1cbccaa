"""``EdgeNode``: one edge node — local inference, telemetry buffer, windows, link, outbox,
status and (optionally) the HTTP API — as one async context manager owning one task group.

    async with EdgeNode(config) as node:
        answers = await node.predict(["some text"])

Entering returns once the buffer is open and the cached (or ``config.model``) model is
loaded; it never waits for the network. A crash in a background task is logged with its
context and the task restarted with backoff; a network-side task (publisher, status, refresh,
safety) is restarted for as long as the node runs, while an essential one (writer, batcher,
windower) that keeps crashing stops the node (the
error comes out of the ``async with``).

When is telemetry durable? With ``durable_ack`` (the default) ``predict`` returns — and the
HTTP answer is sent — only after the group commit holding the inference's event row, so a
``kill -9`` at any instant loses no telemetry of an answered inference; the restarted node
continues ``seq`` from SQLite. With ``durable_ack=False`` the answer comes first and the
rows of the last few milliseconds can be lost to a ``kill -9``.

The node is the one wiring point: it builds every part and hands each what it needs (the
safety monitor's ``is_blocked`` to the refresher, counters and ``report_status`` to the
monitor); no part imports the node. The command serves the HTTP API on a running node
(``edge.api.serve_api``).

Closing a window, the one path from stored events to a numbered aggregate:
``Windower.tick`` (``edge.window``, at each boundary) → ``Buffer.close_window``
(``edge.buffer``, one transaction) → ``window.build_aggregate`` → ``privacy.suppress`` for a
window under k, else ``privacy.add_noise`` when DP is on → the outbox row → ``window.compact``
when the outbox outgrew its bound.

A data directory belongs to one running node at a time (``DataDirInUse`` otherwise).
Prediction ids for feedback are remembered in memory (``feedback_memory`` most recent); after
a restart, feedback on older ids answers ``UnknownPrediction``.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import anyio
import anyio.abc
import msgspec
import structlog

from slmops.edge._lock import DataDirLock
from slmops.edge.buffer import Buffer
from slmops.edge.config import EdgeConfig
from slmops.edge.errors import FeedbackConflict, InvalidInput, NodeClosed, UnknownPrediction
from slmops.edge.fleetconfig import ConfigFollower, Hooks, Resolved
from slmops.edge.generate import Generations
from slmops.edge.inference import Batcher, Result
from slmops.edge.keys import KeyFollower
from slmops.edge.ledger import PrivacyLedger
from slmops.edge.models import ActiveModel, ModelManager
from slmops.edge.outbox import Publisher
from slmops.edge.refresh import Refresher
from slmops.edge.safety import Counters, SafetyMonitor
from slmops.edge.status import StatusReporter, device_profile
from slmops.edge.window import Windower
from slmops.shared.backoff import Backoff
from slmops.shared.bundle import TrustStore, load_public_key, read_bundle
from slmops.shared.connect import ConnectFactory, Link, connect_attempt
from slmops.shared.errors import BundleError
from slmops.shared.logging import set_level
from slmops.shared.messages import DeviceProfile, ModelManifest, ModelRef, NodeStatus
from slmops.shared.names import status_subject, telemetry_subject
from slmops.shared.profiles import ProfileSpec, load_profile
from slmops.shared.vocabulary import NodeEvent

__all__ = ["EdgeNode", "NodeCounters", "PredictionOut", "Texts"]

#: An essential task that crashed this many times within ``_CRASH_WINDOW`` seconds stops
#: the node: without its writer, batcher or windower it cannot keep its promises.
_MAX_CRASHES = 5
_CRASH_WINDOW = 60.0
#: Tasks that only talk to the network (or watch health) never stop the node: inference goes
#: on offline, so a refused permission or a broken server must not take answers down. They
#: restart with backoff up to this many seconds, for as long as the node runs.
_OPTIONAL_TASKS = frozenset({"publisher", "status", "refresh", "safety", "fleetconfig", "keys"})
_OPTIONAL_MAX_DELAY = 60.0
#: Characters of one slice of a big request (see ``EdgeNode.predict``): ~100 ms of
#: tokenizing on the test machine, so slices interleave finely with other requests.
_SLICE_CHARS = 65_536


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


#: Where a model of each task is served (for the error naming the right endpoint).
_ENDPOINT_OF = {"embedding": "/v1/embed", "generation": "/v1/generate or /v1/chat/completions"}


class EmbeddingsOut(msgspec.Struct, kw_only=True):
    """What ``/v1/embed`` answers: one L2-normalised vector per text."""

    embeddings: list[list[float]]
    model: ModelRef
    durable: bool = True


class PredictionOut(msgspec.Struct, kw_only=True):
    """One answer: what the app gets per text."""

    prediction_id: str
    label: str
    confidence: float
    model: ModelRef
    #: Whether this inference's telemetry row is stored (False while the disk fails: it is
    #: then counted in the durable loss receipt instead; also False without ``durable_ack``,
    #: when the answer does not wait for the commit).
    durable: bool = True


class Texts(tuple[str, ...]):
    """Texts already checked against a node's limits (``EdgeNode.texts``)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class NodeCounters:
    """Cumulative counters of a running node (``EdgeNode.statistics()``)."""

    served: int  #: inferences answered
    failed: int  #: inferences that failed in the model
    batches: int  #: micro-batches run
    model_seconds: float  #: seconds spent in featurize + ONNX Runtime
    published: int  #: aggregates acknowledged by JetStream


class _Remembered:
    __slots__ = ("labels", "model_id", "predicted", "used")

    def __init__(self, model_id: int, labels: list[str], predicted: str) -> None:
        self.model_id = model_id
        self.labels = labels
        self.predicted = predicted
        self.used = False


class EdgeNode:
    """See the module docstring. Public attributes: ``config``, ``models`` (ModelManager),
    ``link`` (shared.connect.Link), ``buffer``, ``log``."""

    def __init__(
        self,
        config: EdgeConfig,
        *,
        clock: Callable[[], float] = time.time,
        connect: ConnectFactory = connect_attempt,
        log_level: str = "info",
    ) -> None:
        """``log_level``: the level the command configured, restored when a pushed
        configuration that changed it is undone."""
        # First: a bad profile file fails the node before anything is made.
        #: The device profile this node runs as (``config.profile``; ConfigError naming the
        #: file and key when it is bad), None when none is configured.
        self.profile: ProfileSpec | None = (
            None if config.profile is None else load_profile(Path(config.profile))
        )
        self._log_level = log_level
        #: The node's own settings (file and flags); ``config`` is what is in effect, with
        #: the pushed fleet configuration applied (``edge.fleetconfig``).
        self.local_config = config
        memory = config.memory_mb
        if memory is None and self.profile is not None:
            memory = self.profile.memory_mb
        self.models = ModelManager(
            config.data_path / "models",
            TrustStore.from_files(config.trust_paths),
            register=self._register_model,
            intra_op_threads=config.intra_op_threads,
            memory_mb=memory,
        )
        #: The fleet's signed key list (issue 17): decides ``models.trust`` with ``--trust``,
        #: the signers of bundles and of pushed fleet configs alike. Loaded before the saved
        #: fleet config is checked again; it follows the link once that exists.
        self.keys = KeyFollower(
            config.data_path,
            [load_public_key(Path(p)) for p in config.trust_root],
            [load_public_key(p) for p in config.trust_paths],
            self.models,
            self.report_status,
        )
        self.keys.load()
        self.fleetcfg = ConfigFollower(
            config, lambda: self.models.trust, Hooks(self._apply_config, self.report_status)
        )
        start = self.fleetcfg.startup()
        config = start.config
        if start.log_level is not None:
            set_level(start.log_level)
        self.config = config
        self._clock = clock
        self.log = structlog.get_logger("edge").bind(fleet=config.fleet, node=config.node)
        self.data_dir = config.data_path
        self.buffer = Buffer(
            config.data_path / "telemetry.db",
            fleet=config.fleet,
            node=config.node,
            k=config.min_count,
            window=config.window,
            outbox_max_bytes=config.outbox_max_bytes,
            dp_epsilon=config.dp_epsilon,
            dp_budget=config.dp_budget,
            commit_interval=config.group_commit_interval,
            clock=clock,
            ledger=PrivacyLedger(config.dp_ledger_path, fleet=config.fleet, node=config.node),
        )
        self.link = Link(
            config.nats_url,
            name=f"slmops-edge-{config.node}",
            fleet=config.fleet,
            node=config.node,
            connect=connect,
            backoff_initial=min(0.5, config.link_backoff_max),
            backoff_max=config.link_backoff_max,
            options=config.connect_options,
            js_domain=config.js_domain,
        )
        self.batcher = Batcher(
            self.models,
            self.buffer,
            max_batch=config.max_batch,
            max_wait=config.max_batch_wait,
            inline_max_chars=config.inline_max_chars,
            clock=clock,
        )
        self.generations = Generations(
            self.models, self.buffer, config.generation, durable=config.durable_ack, clock=clock
        )
        # The close path (module docstring): windower -> buffer -> window -> privacy -> buffer.
        self.windower = Windower(config.window, self.buffer.close_window, clock=clock)
        self.windower.on_window = self._window_changed
        self.fleetcfg.link = self.link
        self.publisher = Publisher(
            self.buffer,
            self.link,
            subject=telemetry_subject(config.fleet, config.node),
            fleet=config.fleet,
            node=config.node,
            max_in_flight=config.max_in_flight,
            timeout=config.publish_timeout,
        )
        self.status = StatusReporter(
            self.link,
            status_subject(config.fleet, config.node),
            self._snapshot,
            interval=config.status_interval,
        )
        batcher = self.batcher
        #: Node-local safety: a new version over its health limits is rolled back here.
        self.safety = SafetyMonitor(
            self.models,
            lambda name: Counters(*batcher.counts_of(name)),
            self.report_status,
            state_path=config.data_path / "safety.json",
            limits=config.safety,
        )
        self.keys.attach(self.link)
        self.refresher = Refresher(
            fleet=config.fleet,
            node=config.node,
            link=self.link,
            models=self.models,
            report=self.report_status,
            timings=config.refresh,
            is_blocked=self.safety.is_blocked,
            on_assigned=self.safety.assigned,
            profile="" if self.profile is None else self.profile.name,
            trust_refresh=self.keys.refresh_now,
        )
        self.started_at = clock()
        self.last_error: str | None = None
        self._boot = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._calls = 0  #: predict calls in progress
        self._memory: OrderedDict[str, _Remembered] = OrderedDict()
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.models.on_change(self._on_model_change)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this EdgeNode is already running")
        self.config.data_path.mkdir(parents=True, exist_ok=True)
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            stack.enter_context(DataDirLock(self.config.data_path))
            await stack.enter_async_context(self.buffer)
            await self._load_models()
            await stack.enter_async_context(self.link)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            for name, fn in (
                ("writer", self.buffer.run_writer),
                ("batcher", self.batcher.run),
                ("windower", self.windower.run),
                ("publisher", self.publisher.run),
                ("status", self.status.run),
                ("refresh", self.refresher.run),
                ("safety", self.safety.run),
                ("fleetconfig", self.fleetcfg.run),
                ("keys", self.keys.run),
            ):
                self._tg.start_soon(self._supervise, name, fn, name=f"edge-{name}")
            for active in self.models.all():  # loaded before the task group: their quality sets
                if active.manifest.generation is not None and active.manifest.generation.quality:
                    self._tg.start_soon(self._run_quality, active)
        except BaseException:
            try:
                await stack.__aexit__(None, None, None)
            finally:
                self.batcher.aclose_nowait()
                self.buffer.discard()
            raise
        self._stack = stack
        self.log.info("node_started", model=self._model_dict())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        with anyio.CancelScope(shield=True):
            self.batcher.close()
            with anyio.move_on_after(1.0):
                await self.report_status(NodeEvent.SHUTDOWN)
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
        self.log.info("node_stopping")
        try:
            return await stack.__aexit__(et, e, tb)
        except BaseExceptionGroup as group:
            # The caller's own error comes back wrapped by our task groups: unwrap it.
            if e is not None and _leaves(group) == [e]:
                raise e from None
            raise
        finally:
            self.batcher.aclose_nowait()

    def _note_live_models(self) -> None:
        """Tell the buffer which model ids are served (the others' last events are retired)."""
        current = self.models.current
        self.buffer.current_model_id = None if current is None else current.model_id
        self.buffer.live_model_ids = {m.model_id for m in self.models.all()}

    async def _load_models(self) -> None:
        await self.models.open()
        self._note_live_models()
        for path in self.config.model_paths:
            try:
                wanted = read_bundle(path).manifest.ref
            except BundleError as exc:
                raise BundleError(exc.bundle, f"--model: {exc.reason}", exc.code) from exc
            active = self.models.get(wanted.name)
            if active is not None and active.ref.version > wanted.version:
                # A newer version arrived (e.g. by assignment) since the flag was written: a
                # restart must not silently downgrade the node.
                self.log.warning(
                    "model_flag_skipped",
                    model=wanted.name,
                    flag_version=wanted.version,
                    current=active.ref.version,
                )
                continue
            await self.models.install(path, source="local")

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        crashes: list[float] = []
        backoff = Backoff(0.1, _OPTIONAL_MAX_DELAY if name in _OPTIONAL_TASKS else 10.0)
        while True:
            try:
                await fn()
                return
            except Exception as exc:
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < _CRASH_WINDOW] + [now]
                self.last_error = f"{name}: {type(exc).__name__}: {exc}"
                if len(crashes) >= _MAX_CRASHES and name not in _OPTIONAL_TASKS:
                    self.log.error(
                        "task_failed_stopping_node", task=name, crashes=len(crashes), exc_info=True
                    )
                    raise
                delay = backoff.next()
                self.log.error("task_crashed", task=name, restart_in=delay, exc_info=True)
            await anyio.sleep(delay)

    # -- pushed configuration ---------------------------------------------------------------

    def _apply_config(self, resolved: Resolved) -> None:
        """Put a pushed configuration into effect (``edge.fleetconfig``; which setting takes
        effect when: ``shared.fleetconfig``). Called with the local one to undo."""
        c = self.config = resolved.config
        b = self.buffer
        b.k, b.dp_epsilon, b.dp_budget = c.min_count, c.dp_epsilon, c.dp_budget
        b.outbox_max_bytes = c.outbox_max_bytes
        self.windower.set_window(c.window)
        self.publisher.timeout = c.publish_timeout
        self.status.interval = c.status_interval
        self.safety.limits = c.safety
        self.refresher.set_timings(c.refresh)
        set_level(resolved.log_level or self._log_level)
        self.link.set_url(c.nats_url)

    def _window_changed(self, window: float) -> None:
        self.buffer.window = window
        self.log.info("window_changed", window=window)

    # -- models -----------------------------------------------------------------------------

    async def _register_model(self, manifest: ModelManifest) -> int:
        info = await self.buffer.register_model(
            manifest.ref,
            list(manifest.labels),
            manifest.edges,
            manifest.embedding,
            out_of_scope=manifest.out_of_scope is not None,
            generation=manifest.generation,
        )
        return info.model_id

    def _on_model_change(self, event: str, active: ActiveModel) -> None:
        self._note_live_models()
        if self.models.current is active:
            self.log = self.log.bind(model_version=active.ref.version)
        if self._tg is not None:
            self._tg.start_soon(self.report_status, event)
            if active.manifest.generation is not None and active.manifest.generation.quality:
                self._tg.start_soon(self._run_quality, active)

    async def _run_quality(self, active: ActiveModel) -> None:
        """The model's quality set, then a status carrying its score (``NodeStatus.quality``)."""
        if await self.generations.run_quality(active) is not None:
            await self.report_status(NodeEvent.PERIODIC)

    # -- Python API -------------------------------------------------------------------------

    def texts(self, value: object, field: str = "texts", *, one: bool | None = None) -> Texts:
        """``value`` checked once against this node's limits: a string (``one=True``), a list
        of strings (``one=False``) or either (None, the Python API). Raises ``InvalidInput``
        naming ``field`` (``field[i]`` for an item)."""
        single = isinstance(value, str)
        if one is True and not single:
            raise InvalidInput(field, f"must be a string, got {type(value).__name__}")
        if single and one is not False:
            value = [value]
        elif not isinstance(value, list | tuple):
            raise InvalidInput(field, f"must be a list of strings, got {type(value).__name__}")
        if not value:
            raise InvalidInput(field, "must hold at least one text")
        if len(value) > self.config.max_texts:
            raise InvalidInput(
                field, f"holds {len(value)} texts, more than the limit {self.config.max_texts}"
            )
        limit = self.config.max_text_chars
        for i, t in enumerate(value):
            name = field if single else f"{field}[{i}]"
            if not isinstance(t, str):
                raise InvalidInput(name, f"must be a string, got {type(t).__name__}")
            if not t.strip():
                raise InvalidInput(name, "must not be empty or only whitespace")
            if len(t) > limit:
                raise InvalidInput(name, f"is {len(t)} characters, more than the limit {limit}")
        return Texts(cast("list[str]", value))

    def _model_for(self, task: str, endpoint: str, model: str | None) -> str | None:
        """The name of the model a request for ``endpoint`` goes to: ``model`` when given
        (it must be served here, and be a ``task`` model), else the first served model of
        that task — the node's only or first model (None before any is installed: the batcher
        then answers ``NoModel``). Raises ``InvalidInput`` naming the field ``model``."""
        served = self.models.all()
        if model is not None:
            if not isinstance(model, str):
                raise InvalidInput("model", f"must be a string, got {type(model).__name__}")
            active = self.models.get(model)
            if active is None and model in self.models.withdrawn:
                return model  # the batcher answers NoModel with the reason (withdrawn, unassigned)
            if active is None:
                raise InvalidInput(
                    "model", f"{model[:64]!r} is not served here (models: {self.models.names})"
                )
            if active.manifest.task != task:
                other = _ENDPOINT_OF.get(active.manifest.task, "/v1/predict")
                raise InvalidInput(
                    "model", f"{model!r} is a {active.manifest.task} model: use {other}, not {endpoint}"
                )
            return model
        for active in served:
            if active.manifest.task == task:
                return active.ref.name
        if served:
            current = served[0]
            other = _ENDPOINT_OF.get(current.manifest.task, "/v1/predict")
            raise InvalidInput(
                "model", f"the model is a {current.manifest.task} model: use {other}, not {endpoint}"
            )
        return None

    async def _infer(self, texts: Sequence[str] | str, model: str | None) -> list[Result]:
        """One ``Result`` per slice of ``texts`` (see ``_slices``), in order, from the model
        named ``model`` (None: the default)."""
        if self._stack is None:
            raise NodeClosed()
        valid = texts if isinstance(texts, Texts) else self.texts(texts)
        self._calls += 1
        results = []
        try:
            for part in self._slices(valid):
                # A lone caller is served in its own task; with company, requests queue and
                # share micro-batches. A big request goes in slices, one queued at a time,
                # so a small request queues behind at most a slice of each big one
                # (issue 13: one text waited 12.6 s behind four 256-text batches).
                result = await self.batcher.serve_now(part, model) if self._calls == 1 else None
                if result is None:
                    result = await self.batcher.predict(part, model)
                results.append(result)
            if self.config.durable_ack:
                for result in results:
                    await result.commit.done.wait()
        finally:
            self._calls -= 1
        return results

    def _slices(self, texts: Sequence[str]) -> list[Sequence[str]]:
        """``texts`` in slices of at most a quarter micro-batch and ``_SLICE_CHARS``
        characters (at least one text each); one slice for a small request."""
        most = max(1, self.config.max_batch // 4)
        if len(texts) <= most and sum(map(len, texts)) <= _SLICE_CHARS:
            return [texts]
        out: list[Sequence[str]] = []
        start = chars = 0
        for i, t in enumerate(texts):
            if i > start and (i - start >= most or chars + len(t) > _SLICE_CHARS):
                out.append(texts[start:i])
                start, chars = i, 0
            chars += len(t)
        out.append(texts[start:])
        return out

    async def embed(self, texts: Sequence[str] | str, model: str | None = None) -> EmbeddingsOut:
        """Embed each text with the embedding model named ``model`` (None: the node's first
        embedding model): L2-normalised vectors. Returns once the telemetry of these
        inferences is committed (``durable_ack``). Raises ``InvalidInput`` (also for a
        classification model or a model not served here), ``NoModel``,
        ``edge.inference.InferenceFailed`` or ``NodeClosed``."""
        name = self._model_for("embedding", "/v1/embed", model)
        results = await self._infer(texts, name)
        first = results[0].model.ref
        if any(r.vectors is None or r.model.ref != first for r in results):
            # the model was swapped (for a classifier, or between slices) meanwhile
            raise InvalidInput("model", "the model changed during the request; send it again")
        return EmbeddingsOut(
            embeddings=[[round(float(x), 7) for x in v] for r in results for v in r.vectors],  # type: ignore[union-attr]
            model=results[0].model.ref,
            durable=all(r.commit.stored for r in results),
        )

    async def predict(self, texts: Sequence[str] | str, model: str | None = None) -> list[PredictionOut]:
        """Predict each text with the classifier named ``model`` (None: the node's first
        classification model). Returns once the telemetry of these inferences is committed
        (``durable_ack``). ``texts`` made by ``texts()`` are not checked again. Raises
        ``InvalidInput`` (also for an embedding model or a model not served here),
        ``NoModel``, ``edge.inference.InferenceFailed`` or ``NodeClosed``."""
        name = self._model_for("classification", "/v1/predict", model)
        results = await self._infer(texts, name)
        if any(r.vectors is not None for r in results):
            raise InvalidInput("model", "the model is an embedding model: use /v1/embed")
        memory, boot, ids = self._memory, self._boot, self._ids
        out = []
        for result in results:  # slices may differ in model after a swap: each says its own
            durable = result.commit.stored
            used = result.model
            ref, labels, mid = used.ref, used.manifest.labels, used.model_id
            for i, conf in zip(result.index, result.confidence, strict=True):
                pid = f"{boot}-{next(ids)}"
                label = labels[i]
                memory[pid] = _Remembered(mid, labels, label)
                out.append(
                    PredictionOut(prediction_id=pid, label=label, confidence=conf, model=ref, durable=durable)
                )
        while len(memory) > self.config.feedback_memory:
            memory.popitem(last=False)
        return out

    async def feedback(self, prediction_id: str, label: str) -> None:
        """Record the true ``label`` of a recent prediction (labels only, never text).
        Raises ``UnknownPrediction``, ``FeedbackConflict`` or ``InvalidInput``."""
        if not isinstance(prediction_id, str) or not prediction_id:
            raise InvalidInput("prediction_id", "must be a non-empty string")
        if not isinstance(label, str):
            raise InvalidInput("label", f"must be a string, got {type(label).__name__}")
        entry = self._memory.get(prediction_id)
        if entry is None:
            raise UnknownPrediction(prediction_id)
        if label not in entry.labels:
            raise InvalidInput("label", f"{label[:64]!r} is not one of the model's labels {entry.labels}")
        if entry.used:
            raise FeedbackConflict(prediction_id)
        entry.used = True
        try:
            await self.buffer.add_feedback(entry.model_id, label, entry.predicted)
        except BaseException:
            entry.used = False
            raise

    def statistics(self) -> NodeCounters:
        """The node's cumulative counters (for ``/metrics``)."""
        b = self.batcher
        return NodeCounters(b.served, b.failed, b.batches, b.model_seconds, self.publisher.published)

    def _model_dict(self) -> dict[str, Any] | None:
        active = self.models.current
        return None if active is None else msgspec.structs.asdict(active.ref)

    def health(self) -> dict[str, Any]:
        """A JSON-able snapshot: model, link, outbox, buffer, last sync, dropped counts."""
        s = self.buffer.statistics()
        status = "no_model" if self.models.current is None else "degraded" if s.degraded else "ok"
        return {
            "status": status,
            "storage": "degraded" if s.degraded else "ok",
            "storage_error": s.degraded,
            "quarantined": self.buffer.quarantined,
            "loss_receipt": {
                "lost_inferences": s.receipt_lost,
                "reported": s.receipt_reported,
                "unrecorded": s.unrecorded_events,
            },
            "fleet": self.config.fleet,
            "node": self.config.node,
            "install": self.buffer.install,
            "model": self._model_dict(),
            "models": [msgspec.structs.asdict(m.ref) for m in self.models.all()],
            "previous_model": None
            if self.models.previous is None
            else msgspec.structs.asdict(self.models.previous),
            "link": self.link.state.value,
            "outbox": s.outbox_depth,
            "pending_events": s.pending_events,
            "outbox_bytes": s.outbox_bytes,
            "buffer_bytes": s.file_bytes,
            "last_sync": None
            if s.last_sync is None
            else datetime.fromtimestamp(s.last_sync, UTC).isoformat(),
            "dropped_inferences": s.dropped_inferences,
            "dropped_aggregates": s.dropped_aggregates,
            "lost_events": s.lost_events,
            "merged_windows": s.merges,
            "served": self.batcher.served,
            "generation": msgspec.structs.asdict(self.generations.statistics()),
            "next_seq": s.next_seq,
            "uptime_s": round(self._clock() - self.started_at, 3),
            "last_error": self.last_error or self.windower.last_error or self.publisher.last_error,
        }

    # -- status -----------------------------------------------------------------------------

    def _snapshot(self, event: str, **fields: Any) -> NodeStatus:
        s = self.buffer.statistics()
        active = self.models.current
        status = NodeStatus(
            fleet=self.config.fleet,
            node=self.config.node,
            install=self.buffer.install,
            storage="degraded" if s.degraded else "ok",
            quarantined=list(self.buffer.quarantined),
            key_list_version=self.keys.version,
            time=datetime.fromtimestamp(self._clock(), UTC),
            event=event,
            device=self._device(),
            model=None if active is None else active.ref,
            models=[m.ref for m in self.models.all()],
            previous_models=[p for n in self.models.names if (p := self.models.previous_of(n)) is not None],
            previous_model=self.models.previous,
            outbox_depth=s.outbox_depth,
            buffer_bytes=s.file_bytes,
            dropped_inferences=s.dropped_inferences + s.receipt_lost,
            dropped_aggregates=s.dropped_aggregates,
            served=self.batcher.served,
            last_seq=s.next_seq - 1,
            last_sync=None if s.last_sync is None else datetime.fromtimestamp(s.last_sync, UTC),
            last_error=self.last_error or self.publisher.last_error,
            quality=self.generations.quality_scores([m.ref for m in self.models.all()]),
            **self.fleetcfg.status_fields(),
        )
        return msgspec.structs.replace(status, **fields) if fields else status

    def _device(self) -> DeviceProfile:
        """What this device is (``edge.status.device_profile``), with the configured profile's
        name and the memory the node holds its models to (what the cloud chooses by)."""
        device = device_profile(self.config.data_path)
        changes: dict[str, Any] = {}
        if self.profile is not None:
            changes["profile"] = self.profile.name
            changes["model_memory_mb"] = self.profile.model_memory_mb
            changes["latency_factor"] = self.profile.latency_factor
        if self.models.memory_mb != device.memory_mb:
            changes["memory_mb"] = self.models.memory_mb
        return msgspec.structs.replace(device, **changes) if changes else device

    async def report_status(self, event: str, **fields: Any) -> bool:
        """Publish a ``NodeStatus`` with ``event`` (and any NodeStatus ``fields``, e.g.
        ``refresh=RefreshResult(...)``) now, if online. Returns whether it was sent."""
        if event == NodeEvent.ROLLBACK:
            self.fleetcfg.safety_tripped(str(fields.get("last_error") or "a model was rolled back"))
        return await self.status.publish(self._snapshot(event, **fields))
