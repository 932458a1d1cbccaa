"""Wire contract: round trips, schema evolution, named-field encoding, JSON Schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from _cloud_util import opened_event
from hypothesis import given
from hypothesis import strategies as st

from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    WIRE_TYPES,
    Assignment,
    ModelRef,
    NodeStatus,
    Privacy,
    TelemetryAggregate,
    decode_json,
    decode_telemetry,
    encode_json,
    encode_telemetry,
    json_schemas,
)

EDGES = [0.0, 0.5, 0.8, 1.0]
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}", fullmatch=True)
counts = st.lists(st.integers(0, 10_000), min_size=3, max_size=3)
times = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC))


@st.composite
def aggregates(draw: st.DrawFn) -> TelemetryAggregate:
    start = draw(times)
    return TelemetryAggregate(
        fleet=draw(ids),
        node=draw(ids),
        model=ModelRef(name="m", version=draw(st.integers(1, 1000)), variant="int8"),
        seq=draw(st.integers(1, 2**53)),
        window_start=start,
        window_end=start + timedelta(seconds=draw(st.integers(1, 3600))),
        count=draw(st.integers(0, 10**9)),
        errors=draw(st.integers(0, 100)),
        class_counts=draw(st.dictionaries(ids, st.integers(0, 10**6), max_size=5)),
        confidence=Histogram(edges=EDGES, counts=draw(counts)),
        input_length=Histogram(edges=EDGES, counts=draw(counts)),
        latency_ms=Histogram(edges=EDGES, counts=draw(counts)),
        privacy=Privacy(k=draw(st.integers(1, 100)), epsilon=draw(st.none() | st.floats(0.01, 10))),
        dropped_inferences=draw(st.integers(0, 100)),
    )


@given(aggregates())
def test_telemetry_round_trips_through_msgpack(agg: TelemetryAggregate) -> None:
    assert decode_telemetry(encode_telemetry(agg)) == agg


@given(aggregates())
def test_telemetry_is_a_map_with_named_seq_and_count(agg: TelemetryAggregate) -> None:
    """Other languages read fields by name, so the msgpack must be a map, not an array."""
    raw = msgspec.msgpack.decode(encode_telemetry(agg))
    assert isinstance(raw, dict)
    assert raw["seq"] == agg.seq
    assert raw["count"] == agg.count
    assert raw["v"] == 1


@given(times, ids, st.integers(0, 10**6))
def test_status_round_trips_through_json(now: datetime, node: str, depth: int) -> None:
    status = NodeStatus(
        fleet="f", node=node, time=now, outbox_depth=depth, model=ModelRef(name="m", version=3)
    )
    assert decode_json(encode_json(status), NodeStatus) == status


def test_old_decoder_reads_newer_message_with_extra_field() -> None:
    class AssignmentV2(Assignment, kw_only=True):
        canary_weight: float = 0.5

    newer = AssignmentV2(fleet="f", model="m", version=2, assigned_at=datetime.now(UTC))
    old = decode_json(encode_json(newer), Assignment)
    assert old.version == 2
    assert not hasattr(old, "canary_weight")


def test_newer_decoder_reads_old_message_using_the_default() -> None:
    class AssignmentV2(Assignment, kw_only=True):
        canary_weight: float = 0.5

    old = Assignment(fleet="f", model="m", version=2, assigned_at=datetime.now(UTC))
    newer = msgspec.json.decode(encode_json(old), type=AssignmentV2)
    assert newer.canary_weight == 0.5
    assert newer.version == 2


def test_decode_error_names_the_bad_field() -> None:
    bad = json.dumps({"fleet": "f", "model": "m", "version": "two", "assigned_at": "2026-01-01T00:00:00Z"})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.version"):
        decode_json(bad.encode(), Assignment)


def test_schema_names_every_wire_message_and_is_json() -> None:
    doc = json.loads(json.dumps(json_schemas()))
    assert set(doc["messages"]) == {t.__name__ for t in WIRE_TYPES}
    drift = doc["$defs"]["DriftEvent"]
    assert {"state", "signal", "effect_size", "scope"} <= set(drift["properties"])
    assert set(drift["properties"]["state"]["enum"]) == {"opened", "updated", "resolved"}


def test_drift_event_json_is_readable_by_plain_json() -> None:
    ev = opened_event(
        "f",
        ModelRef(name="m", version=1),
        id="e1",
        statistic="G",
        value=12.5,
        p_value=0.001,
        effect_size=0.12,
    )
    doc = json.loads(encode_json(ev))
    assert doc["state"] == "opened"
    assert doc["model"] == {"name": "m", "version": 1, "variant": "fp32"}
