"""Read-only views for analysts: the drift event stream and the fleet state snapshot.

``watch_drift`` replays ``SLMOPS_DRIFT`` (everything, or from a start time) with an ordered
consumer and then follows it live; ``fleet_status`` reads the per-node snapshots the active
cloud instance writes to KV ``slmops_fleet`` (``snapshot.py``).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js import api as js_api

from slmops.cloud.ingest.snapshot import FLEET_BUCKET, NodeSnapshot
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NotFound
from slmops.shared.jetstream import consumerless, msgs_by_gets, nats_errors, url_of
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
    if consumerless(js):
        async for event in _watch_by_gets(nc, subject, since):
            yield event
        return
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


#: Replayed event ids remembered to drop the live copies of the last ones (``_watch_by_gets``).
_RECENT_IDS = 1024
#: Live drift events buffered while the replay runs (nats-py drops beyond it: slow consumer).
_LIVE_BUFFER = 4096


async def _watch_by_gets(nc: NATS, subject: str, since: datetime | None) -> AsyncIterator[DriftEvent]:
    """``watch_drift`` without a consumer (an analyst, ``shared.kv.consumerless``): a core
    subscription on ``subject`` first, then the stored events up to the stream's last sequence
    by message gets (``since``: by their stored time), then the live ones; the live copies of
    events the replay already gave (published as it started) are dropped by event id."""
    js, url = nc.jetstream(), url_of(nc)
    with nats_errors("subscription", subject, url):
        sub = await nc.subscribe(subject, pending_msgs_limit=_LIVE_BUFFER)
    try:
        try:
            with nats_errors("stream", DRIFT_STREAM, url):
                last = (await js.stream_info(DRIFT_STREAM)).state.last_seq
        except NotFound:  # no stream yet: nothing stored
            last = 0
        recent: collections.deque[str] = collections.deque(maxlen=_RECENT_IDS)
        if last > 0:
            async for raw in msgs_by_gets(js, DRIFT_STREAM, subject, url, last=last, since=since):
                event = _decode(raw.subject or subject, raw.data or b"")
                if event is not None:
                    recent.append(event.id)
                    yield event
        seen = set(recent)
        while True:
            with nats_errors("subscription", subject, url):
                try:
                    msg = await sub.next_msg(timeout=None)
                except TimeoutError:  # nats-py's own TimeoutError is one
                    continue
            event = _decode(msg.subject, msg.data)
            if event is not None and event.id not in seen:
                yield event
    finally:
        with (
            contextlib.suppress(NatsUnavailable, JetStreamRefused),
            nats_errors("subscription", subject, url),
        ):
            await sub.unsubscribe()


def _decode(subject: str, data: bytes) -> DriftEvent | None:
    try:
        return decode_json(data, DriftEvent)
    except msgspec.DecodeError as exc:
        log.warning("drift_event_undecodable", subject=subject, error=str(exc))
        return None


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
