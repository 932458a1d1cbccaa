"""``slmops bench fuzz``: hypothesis against every wire decoder and the whole cloud ingest path.

Two properties (also run by ``tests/test_cloud_fuzz.py`` with a few hundred examples each):

* **decoders**: ``decode_telemetry`` and ``decode_json`` of every wire message type, fed
  arbitrary bytes, arbitrary JSON/msgpack documents (deep nesting, integers at and beyond the
  64-bit edges, NaN and infinities) and real messages with hostile fields. The only
  exceptions allowed are ``msgspec.DecodeError`` (``ValidationError`` included) and
  ``ValueError`` (a Struct's ``__post_init__``); anything else is an *escape*.
* **ingest**: the whole path of ``cloud.ingest.consumers.ingest_batch`` — decode, range and
  manifest checks, dedupe, fleet state, drift detectors, one SQLite commit on a real file —
  fed batches of such messages on node subjects. Every message must come back either applied
  or as a dead letter with a reason; any exception out of the batch is an escape.

Hypothesis drives synchronous functions; the async ingest path runs in one event loop held
by an anyio blocking portal, with one ``Applier`` across examples (state accumulates, as in a
real service). The run reports examples tried and escapes (with the first one's repr).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["FuzzResult", "fuzz_decoders", "fuzz_ingest", "run"]

_DEPTHS = (1, 2, 50, 200, 1000, 5000)
_EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**53, 2**63 - 1, -(2**63), 2**64 - 1, 2**40, 2**40 + 1)
_FLEET = "fuzz"
_DEEP = "\x00deep\x00"
_NODES = ("n1", "n2", "n3")


class FuzzResult(msgspec.Struct, kw_only=True):
    prop: str
    examples: int
    escapes: int
    seconds: float
    first_escape: str | None = None
    #: Ingest only: messages applied (or dropped as duplicates) and dead-lettered.
    applied: int = 0
    deadlettered: int = 0


def _strategies() -> dict[str, Any]:
    from hypothesis import strategies as st

    ints = st.one_of(st.sampled_from(_EDGE_INTS), st.integers(-(2**63), 2**64 - 1), st.integers(-5, 500))
    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf]))
    leaf = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=8))
    tree = st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=20,
    )

    # A marker that ``_encode`` turns into that many nested arrays in the bytes themselves
    # (building the objects would hit the encoders' own recursion limits first).
    deep_values = st.sampled_from(_DEPTHS).map(lambda d: f"{_DEEP}{d}{_DEEP}")
    return {"ints": ints, "floats": floats, "tree": tree, "deep": deep_values}


def _base_aggregate(seq: int, node: str, now: datetime) -> dict[str, Any]:
    from slmops.shared.histogram import Histogram
    from slmops.shared.messages import ModelRef, Privacy, TelemetryAggregate

    edges_c = [0.0, 0.5, 0.8, 1.0001]
    edges_l = [0.0, 8.0, 64.0, 1e9]
    edges_t = [0.0, 5.0, 50.0, 1e9]
    agg = TelemetryAggregate(
        fleet=_FLEET,
        node=node,
        model=ModelRef(name="fz", version=1, variant="fp32"),
        seq=seq,
        window_start=now - timedelta(minutes=2),
        window_end=now - timedelta(minutes=1),
        count=120,
        errors=2,
        class_counts={"a": 60, "b": 58},
        confidence=Histogram(edges=edges_c, counts=[10, 50, 58]),
        input_length=Histogram(edges=edges_l, counts=[40, 60, 18]),
        latency_ms=Histogram(edges=edges_t, counts=[100, 15, 3]),
        privacy=Privacy(k=5),
    )
    doc: dict[str, Any] = msgspec.to_builtins(agg)
    return doc


def _manifest() -> Any:
    from slmops.bench._fleet import synthetic_manifest
    from slmops.shared.histogram import Histogram
    from slmops.shared.messages import HistogramEdges, ModelRef, ReferenceProfile

    ref = ReferenceProfile(
        count=1000,
        class_counts={"a": 500, "b": 500},
        confidence=Histogram(edges=[0.0, 0.5, 0.8, 1.0001], counts=[100, 400, 500]),
        input_length=Histogram(edges=[0.0, 8.0, 64.0, 1e9], counts=[300, 500, 200]),
    )
    return synthetic_manifest(
        ModelRef(name="fz", version=1, variant="fp32"),
        ["a", "b"],
        HistogramEdges(
            confidence=[0.0, 0.5, 0.8, 1.0001],
            input_length=[0.0, 8.0, 64.0, 1e9],
            latency_ms=[0.0, 5.0, 50.0, 1e9],
        ),
        ref,
    )


def _encode(doc: Any, fmt: str) -> bytes:
    """``doc`` as msgpack or JSON, each deep-nesting marker replaced by that many nested
    arrays (``[[[...null...]]]``)."""
    enc = msgspec.json.encode if fmt == "json" else msgspec.msgpack.encode
    try:
        data = enc(doc)
    except (OverflowError, TypeError, ValueError):
        return b""
    for depth in _DEPTHS:
        marker = enc(f"{_DEEP}{depth}{_DEEP}")
        if marker in data:
            nested = b"[" * depth + b"null" + b"]" * depth if fmt == "json" else b"\x91" * depth + b"\xc0"
            data = data.replace(marker, nested)
    return data


def _run_property(prop: Callable[..., None], name: str, examples: int, seed: int | None) -> FuzzResult:
    from hypothesis import HealthCheck, settings
    from hypothesis import seed as hseed

    count = 0
    escapes: list[str] = []

    def counting(value: Any) -> None:
        nonlocal count
        count += 1
        try:
            prop(value)
        except _Escape as exc:
            escapes.append(str(exc))

    wrapped = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(prop.__dict__["_given"](counting))
    if seed is not None:
        wrapped = hseed(seed)(wrapped)
    t0 = time.perf_counter()
    wrapped()
    return FuzzResult(
        prop=name,
        examples=count,
        escapes=len(escapes),
        seconds=time.perf_counter() - t0,
        first_escape=escapes[0] if escapes else None,
    )


class _Escape(Exception):
    """An exception a decoder or the ingest path should never let out."""


def fuzz_decoders(examples: int, *, seed: int | None = None) -> FuzzResult:
    """Every wire decoder against hostile bytes and documents; see the module docstring."""
    from hypothesis import given
    from hypothesis import strategies as st

    from slmops.shared.messages import WIRE_TYPES, decode_json, decode_telemetry

    s = _strategies()
    now = datetime.now(UTC)
    field_values = st.one_of(s["ints"], s["floats"], s["tree"], s["deep"])
    base = _base_aggregate(1, "n1", now)
    hostile_agg = st.tuples(st.sampled_from(sorted(base)), field_values).map(
        lambda kv: {**base, kv[0]: kv[1]}
    )
    extra_field = st.tuples(st.text(min_size=1, max_size=5), s["deep"]).map(lambda kv: {**base, kv[0]: kv[1]})
    documents = st.one_of(s["tree"], s["deep"], hostile_agg, extra_field)
    inputs = st.one_of(
        st.binary(max_size=300),
        st.tuples(documents, st.sampled_from(["json", "msgpack"])).map(lambda d: _encode(*d)),
    )
    decoders: list[Callable[[bytes], Any]] = [decode_telemetry]
    decoders += [lambda b, t=t: decode_json(b, t) for t in WIRE_TYPES]  # type: ignore[misc]

    def prop(data: bytes) -> None:
        for decode in decoders:
            try:
                decode(data)
            except (msgspec.DecodeError, ValueError):
                pass
            except BaseException as exc:
                raise _Escape(f"{type(exc).__name__}: {str(exc)[:200]} on {data[:80]!r}") from exc

    prop.__dict__["_given"] = given(inputs)
    return _run_property(prop, "decoders", examples, seed)


def fuzz_ingest(examples: int, *, seed: int | None = None) -> FuzzResult:
    """The whole ingest path (``ingest_batch``) on a real SQLite file; see the module docstring."""
    from anyio.from_thread import start_blocking_portal
    from hypothesis import given
    from hypothesis import strategies as st
    from nats.aio.msg import Msg

    from slmops.cloud.config import DriftConfig
    from slmops.cloud.drift.calibrate import Calibrator
    from slmops.cloud.drift.detector import DriftDetector
    from slmops.cloud.ingest.apply import Applier
    from slmops.cloud.ingest.consumers import ingest_batch
    from slmops.cloud.ingest.events import EventPublisher
    from slmops.cloud.ingest.state import StateStore
    from slmops.shared.names import telemetry_subject

    s = _strategies()
    now = datetime.now(UTC)
    manifest = _manifest()
    field_values = st.one_of(
        s["ints"],
        s["floats"],
        s["tree"],
        s["deep"],
        st.sampled_from(
            [
                "9999-12-31T00:00:00Z",
                "1970-01-01T00:00:00Z",
                "2026-01-01T00:00:00",
                {"edges": [math.nan, 1.0], "counts": [1]},
                {"edges": [0.0, 0.5, 0.8, 1.0001], "counts": [-(2**63), 0, 2**63 - 1]},
                {"a": 2**64 - 1},
                {"zz": -1},
                {"a": {"zz": 5}},
            ]
        ),
    )

    @st.composite
    def message(draw: Any) -> tuple[str, bytes]:
        node = draw(st.sampled_from(_NODES))
        doc = _base_aggregate(draw(st.integers(1, 60)), node, now)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.one_of(st.sampled_from(sorted(doc)), st.text(min_size=1, max_size=4)))
            doc[key] = draw(field_values)
        if draw(st.booleans()):
            doc["class_counts"] = {"a": doc["count"]} if isinstance(doc.get("count"), int) else {}
        subject_node = node if draw(st.integers(0, 9)) else draw(st.sampled_from(_NODES))
        fmt = draw(st.sampled_from(["msgpack", "msgpack", "msgpack", "json"]))
        return telemetry_subject(_FLEET, subject_node), _encode(doc, fmt)

    batches = st.lists(message(), min_size=1, max_size=8)

    async def manifests(js: Any, model: Any) -> Any:
        return manifest if model.name == "fz" else None

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slmops-fuzz-")))
        portal = stack.enter_context(start_blocking_portal())
        store = portal.call(StateStore(tmp / "cloud.sqlite3").__aenter__)
        stack.callback(lambda: portal.call(store.__aexit__, None, None, None))
        config = msgspec.convert({"calibration_windows": 10_000}, DriftConfig)
        detector = DriftDetector(config, lambda: datetime.now(UTC), Calibrator(windows=10_000).non_blocking())
        publisher = EventPublisher(None, store, [])  # type: ignore[arg-type]  # never run: rows pile up
        applier = Applier(
            store,
            detector,
            {},
            {},
            publisher,
            None,
            clock=lambda: datetime.now(UTC),
            manifest_source=manifests,
        )
        sseq = 0
        totals = [0, 0]

        def prop(batch: list[tuple[str, bytes]]) -> None:
            nonlocal sseq
            msgs = []
            for subject, data in batch:
                sseq += 1
                ts = time.time_ns()
                reply = f"$JS.ACK.SLMOPS_TELEMETRY.fuzz.1.{sseq}.{sseq}.{ts}.0"
                msgs.append(Msg(_client=None, subject=subject, reply=reply, data=data))  # type: ignore[arg-type]

            async def one() -> tuple[int, int]:
                good, bad = await ingest_batch(applier, None, msgs, set())  # type: ignore[arg-type]
                return len(good), len(bad)

            try:
                good, bad = portal.call(one)
            except BaseException as exc:
                raise _Escape(f"{type(exc).__name__}: {str(exc)[:200]} on {batch[0][1][:80]!r}") from exc
            if good + bad != len(msgs):
                raise _Escape(f"{len(msgs)} messages in, {good} applied + {bad} dead letters out")
            totals[0] += good
            totals[1] += bad
            publisher._pending.clear()

        prop.__dict__["_given"] = given(batches)
        result = _run_property(prop, "ingest", examples, seed)
        result.applied, result.deadlettered = totals
        return result


async def run(quick: bool = False, examples: int | None = None) -> list[dict[str, object]]:
    """Both properties with ``examples`` each (10,000 by default, 300 with ``quick``); the
    result's ``project`` is the examples tried, ``baseline`` the escapes allowed (0)."""
    import anyio.to_thread

    n = examples or (300 if quick else 10_000)
    out: list[dict[str, object]] = []
    for fn in (fuzz_decoders, fuzz_ingest):
        r = await anyio.to_thread.run_sync(fn, n)
        out.append(
            {
                "scenario": f"fuzz {r.prop}",
                "project": r.examples,
                "baseline": 0,
                "ratio": r.escapes / max(r.examples, 1),
                "units": "examples (ratio = escapes per example)",
                "escapes": r.escapes,
                "seconds": round(r.seconds, 1),
                "first_escape": r.first_escape,
                **({"applied": r.applied, "deadlettered": r.deadlettered} if r.prop == "ingest" else {}),
            }
        )
    return out
