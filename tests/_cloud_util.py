"""Helpers for the cloud tests: real aggregates built with shared.messages, a manifest with a
reference profile, publishing with ``Nats-Msg-Id``, and reading drift events back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from nats.js import JetStreamContext
from nats.js import api as js_api

from slmops.bench._fleet import synthetic_aggregate, synthetic_manifest
from slmops.cloud.config import CloudConfig, DriftConfig
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    DriftEvent,
    HistogramEdges,
    ModelManifest,
    ModelRef,
    ReferenceProfile,
    TelemetryAggregate,
    decode_json,
    encode_json,
    encode_telemetry,
)
from slmops.shared.names import MODELS_MANIFEST_BUCKET, drift_subject, manifest_key, msg_id, telemetry_subject

LABELS = ["alpha", "beta", "gamma"]
CONF_EDGES = [0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001]
LEN_EDGES = [0.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1e9]
LAT_EDGES = [0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 1e9]
PRIOR = [0.5, 0.3, 0.2]
CONF_P = [0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.2, 0.2]
LEN_P = [0.05, 0.15, 0.3, 0.3, 0.15, 0.04, 0.01]
LAT_P = [0.3, 0.4, 0.2, 0.08, 0.015, 0.005]
MODEL = ModelRef(name="kw", version=1, variant="fp32")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
EDGES = HistogramEdges(confidence=CONF_EDGES, input_length=LEN_EDGES, latency_ms=LAT_EDGES)


def make_aggregate(
    fleet: str,
    node: str,
    seq: int,
    n: int,
    rng: np.random.Generator,
    *,
    prior: list[float] = PRIOR,
    model: ModelRef = MODEL,
) -> TelemetryAggregate:
    cc = rng.multinomial(n, prior)
    counts = {label: int(c) for label, c in zip(LABELS, cc, strict=True)}
    return synthetic_aggregate(
        fleet, node, model, seq, counts, rng, edges=EDGES, shares=(CONF_P, LEN_P, LAT_P), error_rate=0.01
    )


def opened_event(fleet: str, model: ModelRef, **fields: Any) -> DriftEvent:
    """A fleet-scope ``class_prior`` drift event opened now (window and time: now), with a
    unique id; ``fields`` gives the statistic and anything else (or overrides these)."""
    now = datetime.now(UTC)
    base: dict[str, Any] = {
        "id": f"{fleet}-class_prior-{uuid.uuid4().hex[:6]}",
        "fleet": fleet,
        "scope": "fleet",
        "model": model,
        "signal": "class_prior",
        "window_start": now,
        "window_end": now,
        "state": "opened",
        "time": now,
    }
    return DriftEvent(**(base | fields))


def make_manifest(model: ModelRef = MODEL, count: int = 20000) -> ModelManifest:
    ref = ReferenceProfile(
        count=count,
        class_counts={label: round(p * count) for label, p in zip(LABELS, PRIOR, strict=True)},
        confidence=Histogram(edges=CONF_EDGES, counts=[round(p * count) for p in CONF_P]),
        input_length=Histogram(edges=LEN_EDGES, counts=[round(p * count) for p in LEN_P]),
        accuracy=0.9,
        confusion={
            "alpha": {"alpha": 900, "beta": 60, "gamma": 40},
            "beta": {"alpha": 50, "beta": 900, "gamma": 50},
            "gamma": {"alpha": 30, "beta": 70, "gamma": 900},
        },
    )
    return synthetic_manifest(
        model,
        LABELS,
        EDGES,
        ref,
    )


async def put_manifest(js: JetStreamContext, manifest: ModelManifest) -> None:
    kv = await js.key_value(MODELS_MANIFEST_BUCKET)
    await kv.put(manifest_key(manifest.name, manifest.version, manifest.variant), encode_json(manifest))


async def publish(js: JetStreamContext, agg: TelemetryAggregate) -> None:
    await js.publish(
        telemetry_subject(agg.fleet, agg.node),
        encode_telemetry(agg),
        headers={"Nats-Msg-Id": msg_id(agg.node, agg.seq, agg.fleet)},  # as the edge does
    )


async def drift_events(js: JetStreamContext, fleet: str) -> list[DriftEvent]:
    """Every drift event stored for ``fleet`` so far, in order."""
    subject = drift_subject(fleet)
    info = await js.stream_info("SLMOPS_DRIFT", subjects_filter=subject)
    total = (info.state.subjects or {}).get(subject, 0)
    if not total:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.ALL)
    out = []
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=5)
            out.append(decode_json(msg.data, DriftEvent))
    finally:
        await sub.unsubscribe()
    return out


def cloud_config(url: str, state: Path, fleet: str, **drift: object) -> CloudConfig:
    return CloudConfig(
        nats_url=url,
        state_dir=str(state),
        fleets=[fleet],
        batch_size=64,
        fetch_timeout=0.2,
        snapshot_interval=0.1,
        drift=msgspec.convert({"calibration_windows": 50_000, **drift}, DriftConfig),
    )
