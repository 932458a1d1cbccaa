"""Read-only views for analysts: the drift event stream and the fleet state snapshot.

``watch_drift`` replays ``SLMOPS_DRIFT`` (everything, or from a start time) with an ordered
consumer and then follows it live; ``fleet_status`` reads the per-node snapshots the active
cloud instance writes to KV ``slmops_fleet`` (``snapshot.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js import api as js_api

from slmops.cloud.ingest.snapshot import FLEET_BUCKET, NodeSnapshot
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NotFound
from slmops.shared.jetstream import nats_errors, url_of
from slmops.shared.kv import kv_values
from slmops.shared.messages import DriftEvent, decode_json
from slmops.shared.names import DRIFT_ALL, DRIFT_STREAM, drift_subject

__all__ = ["fleet_status", "watch_drift"]

log = structlog.get_logger(__name__)

_snapshot_decoder = msgspec.json.Decoder(NodeSnapshot)


async def watch_drift(nc: NATS, fleet: str | None, since: datetime | None) -> AsyncIterator[DriftEvent]:
    """Drift events of ``fleet`` (all fleets when None) from ``since`` (all stored when None),
    then new ones as they arrive, forever. Undecodable events are logged and skipped."""
    js = nc.jetstream()
    subject = drift_subject(fleet) if fleet else DRIFT_ALL
    if since is None:
        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    else:
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_TIME, opt_start_time=since
        )
    with nats_errors("subscription", subject, url_of(nc)):
        sub = await js.subscribe(subject, stream=DRIFT_STREAM, ordered_consumer=True, config=config)
    try:
        while True:
            with nats_errors("subscription", subject, url_of(nc)):
                try:
                    msg = await sub.next_msg(timeout=None)
                except TimeoutError:  # nats-py's own TimeoutError is one
                    continue
            try:
                yield decode_json(msg.data, DriftEvent)
            except msgspec.DecodeError as exc:
                log.warning("drift_event_undecodable", subject=msg.subject, error=str(exc))
    finally:
        with (
            contextlib.suppress(NatsUnavailable, JetStreamRefused),
            nats_errors("subscription", subject, url_of(nc)),
        ):
            await sub.unsubscribe()


async def fleet_status(nc: NATS, fleet: str | None) -> list[NodeSnapshot]:
    """The last snapshot of every node (of ``fleet``), sorted by fleet and node; empty when the
    cloud never ran."""
    js = nc.jetstream()
    try:
        with nats_errors("kv bucket", FLEET_BUCKET, url_of(nc)):
            # Not kv.keys() or a bare watch: both can end their replay early (shared/kv.py).
            values = await kv_values(js, FLEET_BUCKET, f"{fleet}.*" if fleet else ">")
    except NotFound:  # no bucket: the cloud never ran
        return []
    out = []
    for key, value in values.items():
        if key.startswith("_"):  # not a node: a forget record (``overview.forget_node``)
            continue
        try:
            out.append(_snapshot_decoder.decode(value))
        except msgspec.DecodeError as exc:
            log.warning("fleet_snapshot_undecodable", key=key, error=str(exc))
    return sorted(out, key=lambda s: (s.fleet, s.node))
