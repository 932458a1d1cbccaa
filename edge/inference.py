"""Micro-batched inference: concurrent requests share one ONNX Runtime call.

``Batcher.run`` takes the first queued request, adds what else is queued (up to
``max_batch`` texts, waiting at most ``max_wait`` for more), runs featurize + ORT in a worker
thread — or, for a batch of at most ``inline_max_chars`` characters, right in the event loop,
where it takes less time than the hand-off to a thread — and hands each request its
predictions. While one batch runs the next one queues, so batches form by themselves under
load even with ``max_wait = 0``. A lone caller with nothing queued is served directly in its
own task (``serve_now``).

Each batch's telemetry rows go to the buffer before the requests are released; a request
then gets the buffer's ``Commit`` and decides whether to wait for it (``durable_ack``).
Inference itself never waits for the disk, the network or a download.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import NamedTuple

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
import structlog

from slmops.edge.buffer import Buffer, Commit
from slmops.edge.errors import EdgeError, NodeClosed, NoModel
from slmops.edge.models import ActiveModel, ModelManager
from slmops.edge.privacy import EventRow, derive_rows, embedding_bins, embedding_rows, error_rows
from slmops.shared.generation import GenerationSession
from slmops.shared.runtime import Session
from slmops.shared.scope import flags as oos_flags

__all__ = ["Batcher", "InferenceFailed", "Result"]

log = structlog.get_logger(__name__)


class InferenceFailed(EdgeError):
    """ONNX Runtime (or preprocessing) failed on a batch, or the model gave a non-finite
    output for some of a request's texts; counted as errors in telemetry. ``code`` is
    ``inference_failed`` or ``non_finite_output`` (the API's error code)."""

    def __init__(self, reason: str, code: str = "inference_failed") -> None:
        self.reason = reason
        self.code = code
        super().__init__(f"inference failed: {reason}")


@dataclass(slots=True, eq=False)
class Result:
    """What one request gets back: per text the class index and confidence, the model that
    made them (labels are ``model.manifest.labels[index]``), and the commit of their
    telemetry rows. For an embedding model, ``vectors`` holds the L2-normalised embeddings
    (``index`` and ``confidence`` are then meaningless)."""

    index: list[int]
    confidence: list[float]
    model: ActiveModel
    commit: Commit
    vectors: npt.NDArray[np.float32] | None = None


class _Request:
    __slots__ = ("done", "error", "model", "result", "texts")

    def __init__(self, texts: Sequence[str], model: str) -> None:
        self.texts = texts
        #: The name of the model it is for: a micro-batch holds requests of one model only.
        self.model = model
        self.done = anyio.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None


class _Counts:
    """One model's cumulative inference counters (``Batcher.counts_of``)."""

    __slots__ = ("batches", "failed", "model_seconds", "served")

    def __init__(self) -> None:
        self.served = 0
        self.failed = 0
        self.batches = 0
        self.model_seconds = 0.0


class Batcher:
    """Runs the model for queued requests in micro-batches (see the module docstring)."""

    def __init__(
        self,
        models: ModelManager,
        buffer: Buffer,
        *,
        max_batch: int,
        max_wait: float,
        inline_max_chars: int = 0,
        queue: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.models = models
        self.buffer = buffer
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.inline_max_chars = inline_max_chars
        self._clock = clock
        # Bounded: under overload callers wait to enqueue (backpressure to the HTTP layer).
        self._send, self._recv = anyio.create_memory_object_stream[_Request](queue)
        #: Requests taken off the queue while gathering another model's batch: served next,
        #: in order (at most what the queue held, so bounded by ``queue``).
        self._held: deque[_Request] = deque()
        self.served = 0
        self.failed = 0
        self.batches = 0
        self.model_seconds = 0.0
        #: The same counters per model name (``counts_of``; the node's safety monitor judges
        #: each model served side by side on its own).
        self._by_model: dict[str, _Counts] = {}
        self._busy = False

    def counts_of(self, model: str) -> tuple[int, int, int, float]:
        """(served, failed, batches, model seconds) of model ``model`` since the node started."""
        c = self._by_model.get(model)
        return (0, 0, 0, 0.0) if c is None else (c.served, c.failed, c.batches, c.model_seconds)

    def _counts(self, model: str) -> _Counts:
        c = self._by_model.get(model)
        if c is None:
            c = self._by_model[model] = _Counts()
        return c

    async def predict(self, texts: Sequence[str], model: str | None = None) -> Result:
        """Run ``texts`` (already validated) through the current version of ``model`` (a
        name; None: the node's default model). Raises ``NoModel``, ``InferenceFailed`` or
        ``NodeClosed``."""
        active = self.models.get(model)
        if active is None:
            raise NoModel(self.models.why_not(model))
        req = _Request(texts, active.ref.name)
        try:
            await self._send.send(req)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise NodeClosed("inference") from exc
        await req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    async def serve_now(self, texts: Sequence[str], model: str | None = None) -> Result | None:
        """Serve ``texts`` right here, in the caller's task, when nothing is queued or
        running and they are small enough to run inline; else None (use ``predict``).

        A lone caller then skips the queue and two task switches (~100-200 µs on the 2-core
        test machine); concurrent callers still queue and share micro-batches."""
        if self.max_wait > 0 or self._busy or self._held or self._recv.statistics().current_buffer_used:
            return None
        active = self.models.get(model)
        if active is None or sum(map(len, texts)) > self.inline_max_chars:
            return None
        try:
            out = _run(active.session, list(texts))
        except Exception:  # the queued path runs it again and reports the failure
            return None
        if not all(out.ok):  # the queued path reports it too (rows, error per request)
            return None
        spec = active.manifest.out_of_scope
        signs = oos_flags(texts, out.confidence, spec, out.unknown) if spec is not None else None
        commit = await self.buffer.append(self._rows(active, out, frozenset(), signs))
        return Result(out.classes, out.confidence, active, commit, out.vectors)

    def _rows(
        self,
        active: ActiveModel,
        out: _Output,
        failed: AbstractSet[int] = frozenset(),
        signs: list[int] | None = None,
    ) -> list[EventRow]:
        """Telemetry rows of a batch; texts at ``failed`` positions are error rows; ``signs``
        the texts' out-of-scope signs (``shared.scope.flags``) when the model counts them."""
        self.batches += 1
        self.model_seconds += out.seconds
        t = self._clock()
        n = len(out.classes)
        good = [i for i in range(n) if i not in failed]
        self.served += len(good)
        self.failed += len(failed)
        c = self._counts(active.ref.name)
        c.batches += 1
        c.model_seconds += out.seconds
        c.served += len(good)
        c.failed += len(failed)
        pick = (lambda xs: xs) if not failed else (lambda xs: [xs[i] for i in good])
        stats = active.manifest.embedding
        if out.vectors is not None and out.norms is not None and stats is not None:
            packed, norm_bins = embedding_bins(out.vectors, out.norms, stats)
            rows = embedding_rows(
                pick(packed),
                pick(norm_bins),
                pick(out.lengths),
                t=t,
                model_id=active.model_id,
                edges=active.manifest.edges,
                latency_ms=out.seconds * 1000.0,
            )
        else:
            rows = derive_rows(
                pick(out.classes),
                pick(out.confidence),
                pick(out.lengths),
                t=t,
                model_id=active.model_id,
                edges=active.manifest.edges,
                latency_ms=out.seconds * 1000.0,
                oos=pick(signs) if signs is not None else None,
            )
        if not failed:
            return rows
        return rows + error_rows(len(failed), t=t, model_id=active.model_id)

    def close(self) -> None:
        """Refuse new requests; queued ones are still served by ``run``."""
        self._send.close()

    def aclose_nowait(self) -> None:
        """Fail what is still queued and release the queue (the node's last step)."""
        self._send.close()
        while self._held:
            req = self._held.popleft()
            req.error = NodeClosed("inference")
            req.done.set()
        while True:
            try:
                req = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            req.error = NodeClosed("inference")
            req.done.set()
        self._recv.close()

    async def run(self) -> None:
        """Serve queued requests until the queue is closed and empty, or cancelled."""
        while True:
            if self._held:
                first = self._held.popleft()
            else:
                try:
                    first = await self._recv.receive()
                except anyio.EndOfStream:
                    return
            batch = await self._gather(first)
            try:
                await self._serve(batch)
            except BaseException as exc:
                for r in batch:
                    if not r.done.is_set():
                        r.error = exc if isinstance(exc, Exception) else NodeClosed("inference")
                        r.done.set()
                raise

    async def _gather(self, first: _Request) -> list[_Request]:
        """``first`` and the queued requests for the same model, up to ``max_batch`` texts;
        those of other models taken meanwhile wait in ``_held`` for their own batch."""
        batch, n = [first], len(first.texts)
        held = [r for r in self._held if r.model == first.model]
        if held:
            for r in held:
                if n >= self.max_batch:
                    break
                self._held.remove(r)
                batch.append(r)
                n += len(r.texts)
            return batch
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            req: _Request | None = None
            try:
                req = self._recv.receive_nowait()
            except anyio.WouldBlock:
                left = deadline - time.monotonic()
                if left > 0:
                    with anyio.move_on_after(left):
                        try:
                            req = await self._recv.receive()
                        except anyio.EndOfStream:
                            req = None
            except anyio.EndOfStream:
                pass
            if req is None:
                break
            if req.model != first.model:
                self._held.append(req)
                continue
            batch.append(req)
            n += len(req.texts)
        return batch

    async def _serve(self, batch: list[_Request]) -> None:
        active = self.models.get(batch[0].model)
        if active is None:
            for r in batch:
                r.error = NoModel(self.models.why_not(batch[0].model))
                r.done.set()
            return
        texts = [t for r in batch for t in r.texts]
        session = active.session
        self._busy = True
        try:
            if sum(map(len, texts)) <= self.inline_max_chars:
                # Cheaper than the hand-off itself (see EdgeConfig.inline_max_chars).
                out = _run(session, texts)
            else:
                out = await anyio.to_thread.run_sync(_run, session, texts)
        except Exception as exc:  # ORT raises several unrelated types; each is one failed batch
            log.error("inference_failed", texts=len(texts), error=repr(exc), model_version=active.ref.version)
            self.failed += len(texts)
            self._counts(active.ref.name).failed += len(texts)
            commit = await self.buffer.append(
                error_rows(len(texts), t=self._clock(), model_id=active.model_id)
            )
            failure = InferenceFailed(f"{type(exc).__name__}: {exc}")
            for r in batch:
                r.error = failure
                r.done.set()
            await commit.done.wait()
            return
        finally:
            self._busy = False
        # A request with a non-finite output for any of its texts is not answered: all its
        # texts are error rows, the other requests of the batch are served as usual.
        failed: set[int] = set()
        bad_requests: dict[int, list[int]] = {}
        if not all(out.ok):
            i = 0
            for k, r in enumerate(batch):
                j = i + len(r.texts)
                bad = [n for n in range(j - i) if not out.ok[i + n]]
                if bad:
                    bad_requests[k] = bad
                    failed.update(range(i, j))
                i = j
            log.warning(
                "non_finite_output",
                texts=len(failed),
                requests=len(bad_requests),
                model_version=active.ref.version,
            )
        spec = active.manifest.out_of_scope
        signs = oos_flags(texts, out.confidence, spec, out.unknown) if spec is not None else None
        commit = await self.buffer.append(self._rows(active, out, failed, signs))
        if len(batch) == 1 and not failed:
            batch[0].result = Result(out.classes, out.confidence, active, commit, out.vectors)
            batch[0].done.set()
            return
        i = 0
        for k, r in enumerate(batch):
            j = i + len(r.texts)
            if k in bad_requests:
                r.error = InferenceFailed(
                    f"the model gave a non-finite output for text(s) {bad_requests[k][:20]} of this request",
                    "non_finite_output",
                )
            else:
                vectors = out.vectors[i:j] if out.vectors is not None else None
                r.result = Result(out.classes[i:j], out.confidence[i:j], active, commit, vectors)
            r.done.set()
            i = j
        if failed:
            await commit.done.wait()


class _Output(NamedTuple):
    classes: list[int]
    confidence: list[float]
    lengths: list[int]
    seconds: float
    #: False where the model gave a non-finite value (that text is an error).
    ok: list[bool]
    #: Embedding models: the normalised vectors [n, dim] and their norms before normalisation.
    vectors: npt.NDArray[np.float32] | None = None
    norms: npt.NDArray[np.float32] | None = None
    #: Tokenizer models: unknown tokens per text (``shared.runtime.Outputs.unknown``).
    unknown: list[int] | None = None


def _run(session: Session | GenerationSession, texts: list[str]) -> _Output:
    """Preprocessing + ORT (``Session.run``, grouped by length), then argmax: no per-text
    objects are made."""
    if not isinstance(session, Session):
        raise InferenceFailed("a generation model neither classifies nor embeds", "wrong_task")
    t0 = time.perf_counter()
    out = session.run(texts)
    seconds = time.perf_counter() - t0
    if session.task == "embedding":
        n = len(texts)
        return _Output(
            [0] * n, [0.0] * n, out.lengths, seconds, out.ok.tolist(), out.values, out.norms, out.unknown
        )
    probs = out.values
    idx = probs.argmax(axis=1)
    conf = probs[np.arange(len(idx)), idx]
    return _Output(idx.tolist(), conf.tolist(), out.lengths, seconds, out.ok.tolist(), unknown=out.unknown)
