"""Serving generation models: admission, streaming, cancellation and the telemetry of each answer.

``Generations.open`` checks a request (messages, limits), admits it or refuses it at once with
``Busy`` when ``max_concurrent`` generations run and ``max_queue`` wait (the API's 429 with
``Retry-After``), and returns a ``Stream``. ``Stream.next`` yields the answer's text as it is
generated, from a worker thread so the event loop never blocks on the model: the first call
runs the prefill and the first token in one thread hop, each later call up to
``STEPS_PER_HOP`` tokens (what they make visible, as one piece);
``Stream.finish`` records the one event row of the answer and, with durable answers, waits for
its group commit (at most ``COMMIT_WAIT_S``, then logs ``generation_commit_wait_gave_up``) —
the API sends the final chunk (``[DONE]``) only after it returns. A stream
closed before its model finished (the client went away, the caller stopped) is recorded as
"cancelled" by ``Stream.aclose``.

What is kept of an answer (``edge.privacy.generation_row``): its stop reason, the bins of its
prompt tokens, time to first token, output tokens, tokens/s and — for a sampled share of
requests (``GenerationSpec.loglik_share``, overridable in ``[generation]``) — the prompt's
likelihood, whether it was empty and which declared refusal category it matched. Never text
or token ids.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import structlog

from slmops.edge.buffer import Buffer, Commit
from slmops.edge.config import GenerationLimits
from slmops.edge.errors import Busy, InvalidInput, NoModel
from slmops.edge.inference import InferenceFailed
from slmops.edge.models import ActiveModel, ModelManager
from slmops.edge.privacy import generation_row
from slmops.shared.generation import GenerationParams, GenerationRun, GenerationSession, PromptTooLong
from slmops.shared.generation import refusal_category as _refusal
from slmops.shared.histogram import bin_index
from slmops.shared.messages import ModelRef, QualityScore

__all__ = ["GenerationOut", "GenerationStats", "Generations", "Stream", "model_id"]

log = structlog.get_logger(__name__)

#: Seconds an answer waits for its telemetry row's commit (durable answers) before it gives up
#: and says so: twice the buffer's SQLite busy timeout (5 s), after which a failing disk has
#: already made the writer answer with a loss receipt; only a stopped writer is slower.
COMMIT_WAIT_S = 10.0
_ROLES = frozenset({"system", "user", "assistant"})
#: Most messages in one request, and stop strings (each at most 64 characters).
_MAX_MESSAGES = 64
_MAX_STOPS = 8
#: Decode steps per worker-thread hop after the first token. Measured with SmolLM2-135M int4
#: (`slmops bench generate`, 2 cores, load ~10): with one step per hop 7.8 % of the node's decode
#: time passed between steps (waiting for the event loop and then the worker to be scheduled
#: again), against ~0 in a bare loop; 4 steps per hop cut the hops, hence that wait, by 4. A
#: streaming client sees the text of up to 4 tokens at once; a cancelled answer computes at
#: most 4 tokens more.
STEPS_PER_HOP = 4


class GenerationOut(msgspec.Struct, kw_only=True):
    """A finished answer (``Generations.generate``)."""

    text: str
    #: "eos", "stop", "length", "cancelled" or "error".
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: dict[str, Any]


class GenerationStats(msgspec.Struct, kw_only=True, frozen=True):
    running: int
    waiting: int
    served: int
    cancelled: int
    failed: int
    refused_busy: int


def _str(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidInput(field, f"is {len(value)} characters, more than the limit {limit}")
    return value


def check_messages(value: object, limit: int) -> list[dict[str, str]]:
    """``value`` as chat messages ``[{"role", "content"}]`` (roles system/user/assistant),
    at most ``limit`` characters of content in all. Raises ``InvalidInput`` naming the field."""
    if not isinstance(value, list) or not value:
        raise InvalidInput("messages", "must be a non-empty list of {role, content} objects")
    if len(value) > _MAX_MESSAGES:
        raise InvalidInput("messages", f"holds {len(value)} messages, more than the limit {_MAX_MESSAGES}")
    out: list[dict[str, str]] = []
    total = 0
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidInput(f"messages[{i}]", f"must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidInput(
                f"messages[{i}].role", f"must be one of {sorted(_ROLES)}, got {str(role)[:32]!r}"
            )
        content = _str(m.get("content"), f"messages[{i}].content", limit)
        total += len(content)
        if total > limit:
            raise InvalidInput("messages", f"hold more than {limit} characters")
        out.append({"role": str(role), "content": content})
    if not any(m["content"].strip() for m in out):
        raise InvalidInput("messages", "must not all be empty or only whitespace")
    return out


class Stream:
    """One admitted generation. Use ``next`` until it returns None, then ``finish``; or
    ``aclose`` at any time (records "cancelled" when the model had not finished)."""

    def __init__(
        self, owner: Generations, active: ActiveModel, run: GenerationRun, sample: bool, started: float
    ) -> None:
        self._owner, self.active, self.run = owner, active, run
        self._sample, self._started = sample, started
        self._first: float | None = None
        self._end: float | None = None
        self._loglik: float | None = None
        self._prefilled = False
        self.reason = ""
        self.commit: Commit | None = None
        self._text: list[str] = []

    @property
    def prompt_tokens(self) -> int:
        return self.run.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return len(self.run.tokens)

    @property
    def text(self) -> str:
        return "".join(self._text)

    async def next(self) -> str | None:
        """The next piece of text ("" possible) or None once the model has finished.
        Raises ``edge.inference.InferenceFailed`` when the model fails (recorded as "error")."""
        if self.reason:
            return None
        try:
            if self.run.reason:  # the last hop's steps finished the answer
                piece = None
            elif not self._prefilled:
                piece = await anyio.to_thread.run_sync(self._prefill_and_step)
            else:
                piece = await anyio.to_thread.run_sync(self._steps, STEPS_PER_HOP)
        except Exception as exc:  # GenAI raises several unrelated types; one failed answer
            log.error("generation_failed", error=repr(exc)[:300], model_version=self.active.ref.version)
            await self._record("error")
            raise InferenceFailed(f"the model failed: {str(exc)[:200]}") from exc
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        if piece is None:
            self._end = now
            return None
        self._text.append(piece)
        return piece

    def _prefill_and_step(self) -> str | None:
        """Worker thread: the prefill (with the sampled log-likelihood) and the first token."""
        self._loglik = self.run.prefill(loglik=self._sample)
        self._prefilled = True
        return self.run.step()

    def _steps(self, most: int) -> str | None:
        """Worker thread: up to ``most`` tokens; their visible text joined (None: finished
        before any token)."""
        out: list[str] = []
        for _ in range(most):
            piece = self.run.step()
            if piece is None:
                break
            out.append(piece)
            if self.run.reason:
                break
        return "".join(out) if out or not self.run.reason else None

    async def finish(self) -> str:
        """Record the finished answer (waits for its commit with durable answers); returns its
        stop reason. Call after ``next`` returned None."""
        if not self.reason:
            await self._record(self.run.reason or "length")
        return self.reason

    async def aclose(self) -> None:
        """Record "cancelled" unless already recorded (shielded: runs under cancellation)."""
        if not self.reason:
            with anyio.CancelScope(shield=True):
                await self._record("cancelled")

    async def _record(self, reason: str) -> None:
        self.reason = reason
        self._owner._release(self, reason)
        active = self.active
        spec = active.session.spec if isinstance(active.session, GenerationSession) else None
        if spec is None:
            return
        edges = active.manifest.edges
        labels = active.manifest.labels
        now = time.perf_counter()
        first = self._first if self._first is not None else now
        end = self._end if self._end is not None else now
        n_out = len(self.run.tokens)
        decode_s = end - first
        tps = (n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else 0.0
        text = self.text
        ll = self._loglik
        row = generation_row(
            t=self._owner.clock(),
            model_id=active.model_id,
            reason=labels.index(reason) if reason in labels else -1,
            loglik_bin=bin_index(edges.confidence, math.exp(ll)) if ll is not None else -1,
            prompt_bin=bin_index(edges.input_length, self.run.prompt_tokens),
            ttft_bin=bin_index(edges.latency_ms, (first - self._started) * 1000.0),
            output_bin=bin_index(spec.edges.output_tokens, n_out),
            tps_bin=bin_index(spec.edges.tokens_per_s, tps),
            empty=not text.strip(),
            refusal=_index(_refusal(text, spec.refusals), list(spec.refusals)),
        )
        if reason == "error":
            row = row._replace(label=-1, error=1)
        try:
            self.commit = await self._owner.buffer.append([row])
            if self._owner.durable:
                # Bounded: this also runs in ``aclose`` (shielded), which must end even when the
                # buffer's writer is gone (a node shutting down).
                with anyio.move_on_after(COMMIT_WAIT_S) as waiting:
                    await self.commit.done.wait()
                if waiting.cancelled_caught:
                    log.warning("generation_commit_wait_gave_up", waited_s=COMMIT_WAIT_S, reason=reason)
        except Exception as exc:  # a closed/failing buffer must not break the answer's cleanup
            log.warning("generation_not_recorded", error=repr(exc)[:200])


def model_id(active: ActiveModel) -> str:
    """The id the OpenAI-compatible API names a served model by: ``name:vVERSION`` (e.g.
    ``smollm2:v3``), accepted back as a request's ``model`` beside the bare name."""
    return f"{active.ref.name}:v{active.ref.version}"


def _index(name: str | None, names: list[str]) -> int | None:
    return None if name is None else names.index(name)


class Generations:
    """The node's generation service (see the module docstring)."""

    def __init__(
        self,
        models: ModelManager,
        buffer: Buffer,
        limits: GenerationLimits,
        *,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.models, self.buffer, self.limits = models, buffer, limits
        self.durable, self.clock = durable, clock
        self._rng = rng or random.Random()
        self._slots = anyio.Semaphore(limits.max_concurrent)
        self._running = 0
        self._waiting = 0
        #: Answers by how they ended ("served", "cancelled", "failed") and requests refused busy.
        self._counts = {"served": 0, "cancelled": 0, "failed": 0, "refused_busy": 0}
        #: Seconds the last answers took (for ``Retry-After``).
        self._mean_s = 1.0
        self._holding: set[Stream] = set()
        #: Quality-set scores by (name, version, variant), each set run once (``run_quality``).
        self._quality: dict[tuple[str, int, str], QualityScore] = {}

    async def run_quality(self, active: ActiveModel) -> QualityScore | None:
        """Run ``active``'s quality set (``GenerationSpec.quality``) once, greedy, one case per
        worker-thread hop, holding one generation slot (so it waits for, and never exceeds,
        ``max_concurrent``); returns and keeps its score (None: not a generation model or no
        quality set). A case the model fails on counts as not passed."""
        session = active.session
        if not isinstance(session, GenerationSession) or not session.spec.quality:
            return None
        ref = active.ref
        key = (ref.name, ref.version, ref.variant)
        if key in self._quality:
            return self._quality[key]
        passed = 0
        async with self._slots:
            # counted as running: ``open``'s Busy check then refuses past ``max_queue`` waiting
            # while the set runs (uncounted, every request was let wait)
            self._running += 1
            try:
                for case in session.spec.quality:
                    try:
                        passed += await anyio.to_thread.run_sync(session.run_quality, [case])
                    except Exception as exc:  # GenAI raises several unrelated types; the case fails
                        log.warning("quality_case_failed", error=repr(exc)[:200], model_version=ref.version)
            finally:
                self._running -= 1
        score = QualityScore(model=ref, passed=passed, total=len(session.spec.quality))
        self._quality[key] = score
        log.info("quality_set_run", model=ref.name, version=ref.version, passed=passed, total=score.total)
        return score

    def quality_scores(self, refs: list[ModelRef]) -> list[QualityScore]:
        """The kept quality scores of ``refs`` (those whose set has run)."""
        keys = [(r.name, r.version, r.variant) for r in refs]
        return [self._quality[k] for k in keys if k in self._quality]

    def statistics(self) -> GenerationStats:
        return GenerationStats(running=self._running, waiting=self._waiting, **self._counts)

    def model_for(self, model: object) -> ActiveModel:
        """The generation model named ``model``: its name, or its id ``name:vVERSION`` as
        ``model_id`` gives it (None: the node's first generation model). Raises
        ``InvalidInput`` (not served, another version, not a generation model) or ``NoModel``."""
        if model is not None:
            if not isinstance(model, str):
                raise InvalidInput("model", f"must be a string, got {type(model).__name__}")
            name, _, version = model.partition(":")
            active = self.models.get(name)
            if active is None or (version and version != f"v{active.ref.version}"):
                served = [model_id(a) for a in self.models.all()]
                raise InvalidInput("model", f"{model[:64]!r} is not served here (models: {served})")
            if active.manifest.task != "generation":
                raise InvalidInput(
                    "model", f"{model!r} is a {active.manifest.task} model, not a generation model"
                )
            return active
        for active in self.models.all():
            if active.manifest.task == "generation":
                return active
        if self.models.all():
            endpoint = {"classification": "/v1/predict", "embedding": "/v1/embed"}
            served = sorted({endpoint.get(a.manifest.task, "/v1/predict") for a in self.models.all()})
            raise InvalidInput(
                "model",
                f"no generation model is served here (the models served answer on {' and '.join(served)})",
            )
        raise NoModel(self.models.why_not(None))

    def params(self, active: ActiveModel, body: dict[str, Any]) -> GenerationParams:
        """Request settings checked against the manifest's (requests lower limits, never
        raise them). Raises ``InvalidInput`` naming the field."""
        spec = active.manifest.generation
        assert spec is not None
        most = spec.max_new_tokens
        n = body.get("max_new_tokens", body.get("max_tokens", body.get("max_completion_tokens")))
        if n is None:
            n = most
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput("max_new_tokens", f"must be an int >= 1, got {str(n)[:32]!r}")
        if n > most:
            raise InvalidInput("max_new_tokens", f"is {n}, more than this model's limit {most}")
        temperature = _number(body.get("temperature"), "temperature", spec.temperature, 0.0, 2.0)
        top_p = _number(body.get("top_p"), "top_p", spec.top_p, 0.0, 1.0)
        stop = body.get("stop")
        stops: list[str] = list(spec.stop)
        if stop is not None:
            items = [stop] if isinstance(stop, str) else stop
            if not isinstance(items, list) or len(items) > _MAX_STOPS:
                raise InvalidInput("stop", f"must be a string or a list of at most {_MAX_STOPS} strings")
            for i, s in enumerate(items):
                stops.append(_str(s, f"stop[{i}]", 64))
        seed = body.get("seed")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31
        ):
            raise InvalidInput("seed", f"must be an int in [0, 2**31), got {str(seed)[:32]!r}")
        return GenerationParams(
            max_new_tokens=n,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(s for s in stops if s),
            seed=seed,
        )

    async def open(
        self, messages: object, body: dict[str, Any] | None = None, model: object = None
    ) -> Stream:
        """Check, admit and start one generation. ``messages``: chat messages or one string
        (a user message). Raises ``InvalidInput`` (bad field, prompt over the token limit),
        ``NoModel`` or ``Busy``."""
        body = body or {}
        limit = self.limits.max_prompt_chars
        # The field a too-long prompt is named by: OpenAI's "messages" for chat, else "prompt".
        field = "prompt" if isinstance(messages, str) else "messages"
        if isinstance(messages, str):
            if not _str(messages, "prompt", limit).strip():
                raise InvalidInput("prompt", "must not be empty or only whitespace")
            msgs = [{"role": "user", "content": messages}]
        else:
            msgs = check_messages(messages, limit)
        active = self.model_for(model)
        session = active.session
        assert isinstance(session, GenerationSession)
        params = self.params(active, body)
        try:
            ids = session.encode(msgs)
        except PromptTooLong as exc:
            raise InvalidInput(
                field, f"the prompt is {exc.tokens} tokens, more than the limit {exc.limit}"
            ) from None
        if self._running >= self.limits.max_concurrent and self._waiting >= self.limits.max_queue:
            self._counts["refused_busy"] += 1
            retry = max(1, math.ceil(self._mean_s * (1 + self._waiting) / self.limits.max_concurrent))
            raise Busy(self._running, self._waiting, retry)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        share = self.limits.loglik_share
        if share is None:
            share = session.spec.loglik_share
        try:
            run = session.start(ids, params)
        except Exception:
            self._running -= 1
            self._slots.release()
            raise
        stream = Stream(self, active, run, self._rng.random() < share, time.perf_counter())
        self._holding.add(stream)
        return stream

    def _release(self, stream: Stream, reason: str) -> None:
        if stream not in self._holding:
            return
        self._holding.discard(stream)
        self._running -= 1
        self._slots.release()
        took = time.perf_counter() - stream._started
        self._mean_s = 0.8 * self._mean_s + 0.2 * took
        self._counts[{"cancelled": "cancelled", "error": "failed"}.get(reason, "served")] += 1

    async def generate(
        self, messages: object, body: dict[str, Any] | None = None, model: object = None
    ) -> GenerationOut:
        """A whole answer (no streaming); returns once its telemetry is committed (durable
        answers). Raises as ``open`` and ``Stream.next``."""
        stream = await self.open(messages, body, model)
        try:
            while await stream.next() is not None:
                pass
            reason = await stream.finish()
        finally:
            await stream.aclose()
        return GenerationOut(
            text=stream.text,
            finish_reason=reason,
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens,
            model=msgspec.structs.asdict(stream.active.ref),
        )


def _number(value: object, field: str, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidInput(field, f"must be a number in [{low}, {high}], got {str(value)[:32]!r}")
    return float(value)
