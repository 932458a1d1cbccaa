"""What ``slmops fleet status``, ``fleet forget`` and ``slmops status`` read: the fleet
snapshots with an online/offline verdict by the server's clock, forgotten nodes, the lease
holders, assignments, open drift events and active rollouts.

Online is judged by the NATS server's time, never the reader's: ``server_time`` takes the
``ts`` field of a ``STREAM.INFO`` answer (the server's clock when it answered), and a node is
online when the server stored a message of it (``NodeSnapshot.last_seen``, also server time)
within ``presence.ONLINE_WITHIN_S``. A reader with a wrong clock therefore sees the same verdict.

Which nodes are hidden (``fleet forget``) and the online rule are ``presence``'s, shared
with the console and ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from slmops.cloud.ingest.presence import (
    FORGOTTEN_PREFIX,
    ONLINE_WITHIN_S,
    Forgotten,
    forgotten,
    is_hidden,
)
from slmops.cloud.ingest.query import fleet_status
from slmops.cloud.ingest.snapshot import NodeSnapshot
from slmops.shared import names
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NotFound
from slmops.shared.jetstream import consumerless, nats_errors, read_by_gets, url_of
from slmops.shared.kv import kv_get, kv_keys, kv_stream, kv_values
from slmops.shared.messages import Assignment, DriftEvent, decode_each, decode_json
from slmops.shared.vocabulary import DriftKind

if TYPE_CHECKING:
    from slmops.cloud.rollout import RolloutState

__all__ = [
    "FORGOTTEN_PREFIX",
    "ONLINE_WITHIN_S",
    "Forgotten",
    "NodeView",
    "active_rollouts",
    "assignments",
    "fleet_view",
    "forget_node",
    "lease_holders",
    "node_keys",
    "open_drift_events",
    "read_views",
    "server_time",
    "stream_views",
]


class NodeView(msgspec.Struct, kw_only=True):
    """One node of ``fleet status``: its snapshot and the verdict by server time."""

    snapshot: NodeSnapshot
    online: bool
    #: Seconds between the server's last message of the node and the server's clock now.
    silent_s: float | None


async def server_time(nc: NATS) -> tuple[datetime, str]:
    """The NATS server's clock now, and where it came from: ``"server"`` (the ``ts`` of a
    ``STREAM.INFO`` answer about one of slmops' streams) or ``"local"`` when no such stream
    exists yet or the server is older than 2.10 (then this process's clock, UTC)."""
    for stream in (f"KV_{names.FLEET_BUCKET}", names.STATUS_STREAM, names.TELEMETRY_STREAM):
        with nats_errors("stream info", stream):
            msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
        try:
            ts = json.loads(msg.data).get("ts")  # absent in an error answer (no such stream)
        except (ValueError, AttributeError):
            ts = None
        if isinstance(ts, str):
            return _parse_rfc3339(ts), "server"
    return datetime.now(UTC), "local"


def _parse_rfc3339(text: str) -> datetime:
    # Go writes nanoseconds; datetime takes microseconds.
    head, _, frac = text.rstrip("Z").partition(".")
    micro = (frac + "000000")[:6] if frac else "0"
    return datetime.fromisoformat(head).replace(microsecond=int(micro), tzinfo=UTC)


async def fleet_view(nc: NATS, fleet: str | None) -> tuple[list[NodeView], datetime, str]:
    """Every node (of ``fleet``) not forgotten, with its online verdict; the server time it
    was judged by and that time's source (``server_time``)."""
    now, clock = await server_time(nc)
    gone = await forgotten(nc.jetstream(), fleet)
    views = [_verdict(n, now, gone) for n in await fleet_status(nc, fleet)]
    return [v for v in views if v is not None], now, clock


async def node_keys(nc: NATS, fleet: str | None) -> list[str]:
    """The sorted ``<fleet>.<node>`` keys of KV ``slmops_fleet`` (of ``fleet``), forget records
    left out; deleted keys may be listed (``read_views`` skips them). One ``STREAM.INFO``
    request, whatever the fleet's size: the first page of ``fleet status`` needs no read of
    every node (issue 18: at 10,000 nodes reading every snapshot took seconds)."""
    try:
        keys = await kv_keys(nc.jetstream(), names.FLEET_BUCKET, f"{fleet}.*" if fleet else ">")
    except NotFound:  # no bucket: the cloud never ran
        return []
    return [k for k in keys if not k.startswith("_")]


#: Snapshot reads in flight at once (``read_views``).
_READS_IN_FLIGHT = 64


async def read_views(
    nc: NATS, keys: Sequence[str], now: datetime, gone: dict[tuple[str, str], Forgotten]
) -> list[NodeView]:
    """The nodes of ``keys`` (from ``node_keys``), in that order, with their online verdict at
    server time ``now``; forgotten (``gone``), deleted and undecodable ones left out. Reads
    ``_READS_IN_FLIGHT`` keys at a time. No keys: none, without opening the bucket (it does
    not exist until a cloud has run). Raises ``NatsUnavailable`` for a failed read."""
    if not keys:
        return []
    kv = await nc.jetstream().key_value(names.FLEET_BUCKET)
    values: list[bytes | None] = [None] * len(keys)
    limiter = anyio.CapacityLimiter(_READS_IN_FLIGHT)

    async def one(i: int) -> None:
        async with limiter:
            entry = await kv_get(kv, keys[i], kind="fleet snapshot")
            values[i] = entry.value if entry is not None else None

    async with anyio.create_task_group() as tg:
        for i in range(len(keys)):
            tg.start_soon(one, i)
    return [v for v in (_view(value, now, gone) for value in values) if v is not None]


async def stream_views(
    nc: NATS, keys: Sequence[str], now: datetime, gone: dict[tuple[str, str], Forgotten]
) -> AsyncGenerator[NodeView]:
    """The nodes of ``keys`` as ``read_views`` gives them, but from one watch of the bucket,
    in the order it delivers them (not sorted): every node at the speed of one watch, the
    first ones at once (``fleet status --json``)."""
    fleets = {k.split(".", 1)[0] for k in keys}
    key_filter = f"{next(iter(fleets))}.*" if len(fleets) == 1 else ">"
    want = set(keys)
    # aclosing: closing this generator early stops the watch now, not at garbage collection
    # (by then the connection is closed and stopping it fails).
    async with contextlib.aclosing(kv_stream(nc.jetstream(), names.FLEET_BUCKET, key_filter, want)) as kvs:
        async for key, value in kvs:
            if key.startswith("_"):
                continue
            view = _view(value, now, gone)
            if view is not None:
                yield view


def _view(value: bytes | None, now: datetime, gone: dict[tuple[str, str], Forgotten]) -> NodeView | None:
    if not value:
        return None
    try:
        n = msgspec.json.decode(value, type=NodeSnapshot)
    except msgspec.DecodeError:
        return None
    return _verdict(n, now, gone)


def _verdict(n: NodeSnapshot, now: datetime, gone: dict[tuple[str, str], Forgotten]) -> NodeView | None:
    """``n`` with its online verdict at server time ``now``; None when it is forgotten."""
    if is_hidden(n.last_seen, gone.get((n.fleet, n.node))):
        return None
    silent = None if n.last_seen is None else max(0.0, (now - n.last_seen).total_seconds())
    return NodeView(snapshot=n, online=silent is not None and silent <= ONLINE_WITHIN_S, silent_s=silent)


async def forget_node(nc: NATS, fleet: str, node: str, *, force: bool = False) -> Forgotten:
    """Hide ``node`` of ``fleet`` from status views (module docstring). Refused with
    ``ValueError`` when the cloud has no such node, or while it is online unless ``force``."""
    names.validate_id(fleet, "fleet")
    names.validate_id(node, "node")
    snapshot = next((n for n in await fleet_status(nc, fleet) if n.node == node), None)
    if snapshot is None:
        raise ValueError(f"no node {node!r} in fleet {fleet!r}: the cloud has no record of it")
    now, _ = await server_time(nc)
    if snapshot.last_seen is not None and not force:
        silent = (now - snapshot.last_seen).total_seconds()
        if silent <= ONLINE_WITHIN_S:
            raise ValueError(
                f"node {node!r} of {fleet!r} is online (heard {silent:.0f} s ago by the server's clock): "
                "stop it first, or give --force (it reappears as soon as it sends again)"
            )
    record = Forgotten(fleet=fleet, node=node, last_seen=snapshot.last_seen, at=now)
    js = nc.jetstream()
    with nats_errors("kv bucket", names.FLEET_BUCKET):
        kv = await js.key_value(names.FLEET_BUCKET)
        await kv.put(f"{FORGOTTEN_PREFIX}.{fleet}.{node}", msgspec.json.encode(record))
    return record


async def lease_holders(js: JetStreamContext) -> dict[str, str]:
    """Lease key (``cloud`` or ``cloud-<fleets>``) -> the instance holding it now."""
    try:
        with nats_errors("kv bucket", names.LEASES_BUCKET):
            values = await kv_values(js, names.LEASES_BUCKET)
    except NotFound:
        return {}
    return {k: v.decode(errors="replace") for k, v in sorted(values.items())}


async def assignments(js: JetStreamContext, fleet: str | None = None) -> list[Assignment]:
    """Every assignment (of ``fleet``): fleet-wide ones (``node`` None) and per-node ones."""
    try:
        with nats_errors("kv bucket", names.ASSIGNMENTS_BUCKET):
            values = await kv_values(js, names.ASSIGNMENTS_BUCKET, f"{fleet}.*" if fleet else ">")
    except NotFound:
        return []
    out = decode_each(values.values(), Assignment)
    return sorted(out, key=lambda a: (a.fleet, a.node or "", a.model))


async def open_drift_events(nc: NATS, fleet: str | None = None) -> list[DriftEvent]:
    """Drift episodes still open (of ``fleet``): the latest event of each episode (its id
    without the state suffix) unless that is ``resolved`` or a later episode superseded it.
    Skew and baseline announcements are not drift. Reads ``SLMOPS_DRIFT`` from its start."""
    from nats.js import api as js_api

    js = nc.jetstream()
    subject = names.drift_subject(fleet) if fleet else names.DRIFT_ALL
    latest: dict[str, DriftEvent] = {}
    superseded: set[str] = set()
    try:
        with nats_errors("stream", names.DRIFT_STREAM):
            info = await js.stream_info(names.DRIFT_STREAM, subjects_filter=subject)
    except NotFound:
        return []
    total = sum((info.state.subjects or {}).values())  # stored now; later ones are not read
    if not total:
        return []

    def take(_subject: str, data: bytes) -> None:
        try:
            e = decode_json(data, DriftEvent)
        except msgspec.DecodeError:
            return
        if e.kind == DriftKind.DRIFT:
            latest[e.id.rsplit(".", 1)[0]] = e
            if e.supersedes:
                superseded.add(e.supersedes.rsplit(".", 1)[0])

    if consumerless(js):  # an analyst: message gets up to the last stored one, no consumer
        await read_by_gets(js, names.DRIFT_STREAM, subject, take, url_of(nc), last=info.state.last_seq)
        return [e for k, e in latest.items() if e.state != "resolved" and k not in superseded]
    config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    with nats_errors("subscription", subject):
        sub = await js.subscribe(subject, stream=names.DRIFT_STREAM, ordered_consumer=True, config=config)
    try:
        for _ in range(total):
            with nats_errors("subscription", subject):
                msg = await sub.next_msg(timeout=10.0)
            take(msg.subject, msg.data)
    finally:
        with contextlib.suppress(NatsUnavailable, JetStreamRefused), nats_errors("subscription", subject):
            await sub.unsubscribe()
    return [e for k, e in latest.items() if e.state != "resolved" and k not in superseded]


async def active_rollouts(js: JetStreamContext, url: str) -> list[RolloutState]:
    """Running or paused rollouts (``RolloutState``), one per fleet at most."""
    from slmops.cloud.rollout import RolloutStore

    return [s for s, _ in await RolloutStore(js, url=url).all(parts=False) if s.active]
