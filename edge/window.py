"""Window aggregates: building one from event counts, merging two, and compacting an outbox
that outgrew its bound (docs/architecture.md §4–5). Pure functions plus the clock-driven ``Windower`` loop.

Merging is adding counts — exact, associative, commutative — so an aggregate merged from many
windows says what the windows said together, and ``count`` sums stay exact under compaction.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import structlog

from slmops.edge.errors import StoreError
from slmops.edge.privacy import unpack_bins, unpack_generation
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    OOS_CELLS,
    STOP_REASONS,
    EmbeddingHistograms,
    EmbeddingStats,
    GenerationEdges,
    GenerationHistograms,
    HistogramEdges,
    ModelRef,
    Privacy,
    TelemetryAggregate,
    encode_telemetry,
)

__all__ = [
    "Cell",
    "Compaction",
    "ModelInfo",
    "Windower",
    "build_aggregate",
    "compact",
    "merge",
    "mergeable",
    "next_tick",
    "to_datetime",
]

log = structlog.get_logger(__name__)

#: ``(label index or -1, conf bin, length bin, latency bin, error flag, how many)``, then
#: optionally the out-of-scope signs (``OOS_*`` bits) of those inferences.
Cell = tuple[int, ...]


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What aggregation needs to know of a model the node served."""

    model_id: int
    ref: ModelRef
    labels: list[str]
    edges: HistogramEdges
    #: An embedding model's statistics (its rows carry projection and norm bins).
    embedding: EmbeddingStats | None = None
    #: Its aggregates carry ``out_of_scope`` counts (the manifest has an ``OutOfScopeSpec``).
    out_of_scope: bool = False
    #: A generation model's extra histogram edges (its rows pack their bins, ``edge.generate``).
    generation: GenerationEdges | None = None
    #: Its declared refusal categories, in manifest order.
    refusals: list[str] = []


def to_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def next_tick(now: float, window: float) -> float:
    """The next window boundary after ``now``: boundaries are multiples of ``window``
    seconds since the epoch, so every node of a fleet closes windows at the same instants."""
    return (math.floor(now / window) + 1) * window


def build_aggregate(
    *,
    fleet: str,
    node: str,
    info: ModelInfo,
    seq: int,
    start: float,
    end: float,
    cells: Iterable[Cell],
    feedback: Iterable[tuple[str, str, int]] = (),
    k: int,
    install: str = "",
) -> TelemetryAggregate:
    """One aggregate from grouped event counts (``cells``) and feedback ``(true, predicted,
    n)`` triples, numbered ``seq`` of node install ``install``. Rows with an unknown class
    index count as errors."""
    e = info.edges
    conf, length, lat = (
        Histogram.empty(e.confidence),
        Histogram.empty(e.input_length),
        Histogram.empty(e.latency_ms),
    )
    classes: dict[str, int] = {}
    oos = [0] * OOS_CELLS if info.out_of_scope else []
    count = errors = 0
    emb = info.embedding
    proj = [Histogram.empty(emb.projection_edges) for _ in emb.directions] if emb is not None else []
    norm = Histogram.empty(emb.norm_edges) if emb is not None else None
    base = len(emb.projection_edges) - 1 if emb is not None else 0
    gen = _GenerationCounts(info) if info.generation is not None else None
    for cell in cells:
        label, cb, lb, tb, err, n = cell[:6]
        count += n
        if gen is not None:
            errors += gen.add(cell, classes, conf, length, lat)
            continue
        if emb is not None and norm is not None and not err and label >= 0:
            for h, b in zip(proj, unpack_bins(label, len(proj), base), strict=True):
                h.counts[min(b, len(h.counts) - 1)] += n
            norm.counts[min(max(cb, 0), len(norm.counts) - 1)] += n
        elif err or not 0 <= label < len(info.labels):
            errors += n
            continue
        else:
            if oos:
                oos[(cell[6] if len(cell) > 6 else 0) % OOS_CELLS] += n
            name = info.labels[label]
            classes[name] = classes.get(name, 0) + n
            conf.counts[min(max(cb, 0), len(conf.counts) - 1)] += n
        length.counts[min(max(lb, 0), len(length.counts) - 1)] += n
        lat.counts[min(max(tb, 0), len(lat.counts) - 1)] += n
    fb: dict[str, dict[str, int]] = {}
    for true, pred, n in feedback:
        row = fb.setdefault(true, {})
        row[pred] = row.get(pred, 0) + n
    return TelemetryAggregate(
        fleet=fleet,
        node=node,
        model=info.ref,
        seq=seq,
        window_start=to_datetime(start),
        window_end=to_datetime(max(end, start)),
        count=count,
        errors=errors,
        class_counts=classes,
        confidence=conf,
        input_length=length,
        latency_ms=lat,
        feedback=fb,
        privacy=Privacy(k=k),
        install=install,
        embedding=EmbeddingHistograms(projections=proj, norm=norm) if norm is not None else None,
        out_of_scope=oos,
        generation=gen.histograms() if gen is not None else None,
    )


class _GenerationCounts:
    """A generation model's cells (``edge.privacy.generation_row``) into its histograms."""

    def __init__(self, info: ModelInfo) -> None:
        edges = info.generation
        assert edges is not None
        self.labels = info.labels
        self.refusal_names = info.refusals
        self.h = GenerationHistograms(
            output_tokens=Histogram.empty(edges.output_tokens),
            tokens_per_s=Histogram.empty(edges.tokens_per_s),
            stop_reasons=dict.fromkeys(STOP_REASONS, 0),
            refusals=dict.fromkeys(info.refusals, 0),
        )

    def add(
        self, cell: Cell, classes: dict[str, int], conf: Histogram, length: Histogram, lat: Histogram
    ) -> int:
        """Count one cell; returns how many of its inferences were errors."""
        label, cb, lb, tb, err, n = cell[:6]
        h = self.h
        if err or not 0 <= label < len(self.labels):
            h.stop_reasons["error"] += n
            return n
        reason = self.labels[label]
        classes[reason] = classes.get(reason, 0) + n
        h.stop_reasons[reason] = h.stop_reasons.get(reason, 0) + n
        if cb >= 0:  # the prompt likelihood was sampled
            conf.counts[min(cb, len(conf.counts) - 1)] += n
            h.loglik_sampled += n
        length.counts[min(max(lb, 0), len(length.counts) - 1)] += n
        lat.counts[min(max(tb, 0), len(lat.counts) - 1)] += n
        ob, sb, empty, refusal = unpack_generation(cell[6] if len(cell) > 6 else 0)
        h.output_tokens.counts[min(ob, len(h.output_tokens.counts) - 1)] += n
        h.tokens_per_s.counts[min(sb, len(h.tokens_per_s.counts) - 1)] += n
        h.empty += n * empty
        if 0 <= refusal < len(self.refusal_names):
            h.refusals[self.refusal_names[refusal]] += n
        return 0

    def histograms(self) -> GenerationHistograms:
        return self.h


def _merge_generation(
    a: GenerationHistograms | None, b: GenerationHistograms | None
) -> GenerationHistograms | None:
    """Field by field: histograms merge, counts per key and plain counts add."""
    if a is None or b is None:
        return a or b
    merged: dict[str, Any] = {}
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        merged[name] = (
            x.merge(y) if isinstance(x, Histogram) else _add(x, y) if isinstance(x, dict) else x + y
        )
    return GenerationHistograms(**merged)


def _generation_edges(a: TelemetryAggregate) -> list[list[float]] | None:
    g = a.generation
    return None if g is None else [g.output_tokens.edges, g.tokens_per_s.edges]


def mergeable(a: TelemetryAggregate, b: TelemetryAggregate) -> bool:
    """Whether ``merge(a, b)`` is defined: same node install, model, bin edges and privacy."""
    return (
        a.fleet == b.fleet
        and a.node == b.node
        and a.install == b.install
        and a.model == b.model
        and a.privacy == b.privacy
        and a.confidence.edges == b.confidence.edges
        and a.input_length.edges == b.input_length.edges
        and a.latency_ms.edges == b.latency_ms.edges
        and _embedding_edges(a) == _embedding_edges(b)
        and len(a.out_of_scope) == len(b.out_of_scope)
        and _generation_edges(a) == _generation_edges(b)
    )


def _embedding_edges(a: TelemetryAggregate) -> list[list[float]] | None:
    e = a.embedding
    return None if e is None else [h.edges for h in e.projections] + [e.norm.edges]


def _merge_embedding(
    a: EmbeddingHistograms | None, b: EmbeddingHistograms | None
) -> EmbeddingHistograms | None:
    if a is None or b is None:
        return a or b
    return EmbeddingHistograms(
        projections=[x.merge(y) for x, y in zip(a.projections, b.projections, strict=True)],
        norm=a.norm.merge(b.norm),
    )


def _add(x: dict[str, int], y: dict[str, int]) -> dict[str, int]:
    out = dict(x)
    for key, n in y.items():
        out[key] = out.get(key, 0) + n
    return out


def merge(a: TelemetryAggregate, b: TelemetryAggregate) -> TelemetryAggregate:
    """One aggregate covering both windows; every count is the sum. Takes the lower ``seq``.
    Raises ``ValueError`` when the two are not ``mergeable``."""
    if not mergeable(a, b):
        raise ValueError(
            f"aggregates seq {a.seq!r} and {b.seq!r} differ in node, model, edges or privacy; "
            "they cannot be merged"
        )
    feedback = {t: dict(row) for t, row in a.feedback.items()}
    for true, row in b.feedback.items():
        feedback[true] = _add(feedback.get(true, {}), row)
    return msgspec.structs.replace(
        a,
        seq=min(a.seq, b.seq),
        window_start=min(a.window_start, b.window_start),
        window_end=max(a.window_end, b.window_end),
        count=a.count + b.count,
        errors=a.errors + b.errors,
        class_counts=_add(a.class_counts, b.class_counts),
        confidence=a.confidence.merge(b.confidence),
        input_length=a.input_length.merge(b.input_length),
        latency_ms=a.latency_ms.merge(b.latency_ms),
        feedback=feedback,
        windows=a.windows + b.windows,
        dropped_inferences=a.dropped_inferences + b.dropped_inferences,
        dropped_aggregates=a.dropped_aggregates + b.dropped_aggregates,
        embedding=_merge_embedding(a.embedding, b.embedding),
        generation=_merge_generation(a.generation, b.generation),
        out_of_scope=[x + y for x, y in zip(a.out_of_scope, b.out_of_scope, strict=True)],
    )


class Compaction(msgspec.Struct, kw_only=True):
    """The result of ``compact``: what stays (renumbered), what was merged and dropped."""

    aggregates: list[TelemetryAggregate]
    merges: int = 0
    #: Aggregates and inferences dropped by this compaction (the newly lost).
    dropped_aggregates: int = 0
    dropped_inferences: int = 0
    #: Loss receipts no surviving aggregate could carry: add them to the next one made.
    carry_inferences: int = 0
    carry_aggregates: int = 0


def compact(
    pending: Sequence[TelemetryAggregate],
    budget: int,
    size: Callable[[TelemetryAggregate], int] = lambda a: len(encode_telemetry(a)),
    *,
    drop_budget: int | None = None,
) -> Compaction:
    """Shrink never-sent aggregates (in ``seq`` order, contiguous) to at most ``budget``
    bytes, docs/architecture.md §5: first merge adjacent mergeable pairs — the pair spanning the fewest
    windows, the oldest on a tie, so old data coarsens gradually — and only when no pair is
    left drop the oldest, moving its count (and the receipts it carried) into the loss
    receipt of the next survivor. Drops stop once the aggregates fit ``drop_budget`` bytes
    (default ``budget``): a bound below it (free disk) only merges, since stored aggregates
    already hold their space and dropping them would lose inferences that were stored.
    Survivors are renumbered from the first ``seq``, so the
    node's sequence has no gap (none of them was ever sent, so no one saw the old numbers).

    Invariant (tested): sum of surviving ``count`` + ``dropped_inferences`` + carried
    receipts equals the input's sum of ``count`` + ``dropped_inferences``.
    """
    if not pending:
        return Compaction(aggregates=[])
    first = pending[0].seq
    aggs = list(pending)
    sizes = [size(a) for a in aggs]
    out = Compaction(aggregates=[])
    while aggs and sum(sizes) > budget:
        best: int | None = None
        for i in range(len(aggs) - 1):
            if mergeable(aggs[i], aggs[i + 1]) and (
                best is None
                or aggs[i].windows + aggs[i + 1].windows < aggs[best].windows + aggs[best + 1].windows
            ):
                best = i
        if best is not None:
            merged = merge(aggs[best], aggs[best + 1])
            aggs[best : best + 2] = [merged]
            sizes[best : best + 2] = [size(merged)]
            out.merges += 1
            continue
        if drop_budget is not None and sum(sizes) <= drop_budget:
            break
        gone = aggs.pop(0)
        sizes.pop(0)
        out.dropped_aggregates += 1
        out.dropped_inferences += gone.count
        lost_inf = gone.count + gone.dropped_inferences
        lost_agg = 1 + gone.dropped_aggregates
        if aggs:
            aggs[0] = msgspec.structs.replace(
                aggs[0],
                dropped_inferences=aggs[0].dropped_inferences + lost_inf,
                dropped_aggregates=aggs[0].dropped_aggregates + lost_agg,
            )
            sizes[0] = size(aggs[0])
        else:
            out.carry_inferences += lost_inf
            out.carry_aggregates += lost_agg
    out.aggregates = [msgspec.structs.replace(a, seq=first + i) for i, a in enumerate(aggs)]
    return out


class Windower:
    """Closes a window at every boundary of ``window`` seconds on ``clock``: calls
    ``close(now)`` (which builds, numbers and stores the aggregates in one transaction).

    ``clock`` gives seconds since the epoch and ``sleep`` waits; both are injected so tests
    can drive time."""

    def __init__(
        self,
        window: float,
        close: Callable[[float], Awaitable[int]],
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    ) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        self.window = window
        self._close = close
        self._clock = clock
        self._sleep = sleep
        self.closed = 0  #: aggregates made so far
        #: Why the last close failed (None once one succeeds).
        self.last_error: str | None = None
        #: A new window length waiting for the next boundary (``set_window``).
        self._next: float | None = None
        #: Called with the new length once it takes effect.
        self.on_window: Callable[[float], object] | None = None

    def set_window(self, window: float) -> None:
        """Use ``window`` seconds from the next boundary on: the window being filled closes
        where it was going to (pushed fleet config, ``edge.fleetconfig``)."""
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        self._next = None if window == self.window else window

    async def tick(self) -> int:
        """Close the window now; returns how many aggregates were made."""
        made = await self._close(self._clock())
        self.closed += made
        return made

    async def run(self) -> None:
        """Close windows at each boundary until cancelled. A close the store refuses (a full
        or failing disk: ``StoreError``) leaves the window open for the next boundary, so the
        loop never stops on it; the first failure and the recovery are logged."""
        failing = False
        while True:
            now = self._clock()
            await self._sleep(max(0.0, next_tick(now, self.window) - now))
            if self._next is not None:
                self.window, self._next = self._next, None
                if self.on_window is not None:
                    self.on_window(self.window)
            try:
                await self.tick()
            except StoreError as exc:
                if not failing:
                    log.error("window_not_closed", error=str(exc), note="retried at the next boundary")
                failing = True
                self.last_error = str(exc)
                continue
            if failing:
                log.warning("windows_closing_again")
                failing = False
                self.last_error = None
