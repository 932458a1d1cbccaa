"""Create the JetStream resources of docs/architecture.md §3, idempotently.

Safe to run at every service start and from several processes at once. A resource that exists
is left alone: settings that differ but do not break slmops (limits, ages, history) are logged,
never overwritten (except a limit the stream lacks entirely, e.g. a stream made by an older
release without one: that limit is set, ``_tighten_stream``); a difference slmops cannot work
with (subjects, storage, retention) raises ``ResourceConflict``. Nothing is ever deleted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api

from slmops.shared import names
from slmops.shared.errors import JetStreamRefused, ProvisionError, ResourceConflict
from slmops.shared.jetstream import (
    ERR_STREAM_NAME_IN_USE,
    ensure_kv,
    ensure_object_store,
    nats_errors,
    stream_info,
    url_of,
)

__all__ = ["STREAMS", "StreamSpec", "ensure_resources"]

log = structlog.get_logger(__name__)

_MAX_REPLICAS = 5  # nats-server's own limit


_MIB = 1024 * 1024
_GIB = 1024 * _MIB


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What slmops wants of one stream. ``None``/-1 limits mean "unlimited"; every stream
    below states an age, a size, a message size and a consumer bound (issue 13 fault 12)."""

    name: str
    subjects: tuple[str, ...]
    max_age: timedelta | None = None
    duplicate_window: timedelta | None = None
    max_msgs_per_subject: int = -1
    max_bytes: int = -1
    #: "old": a full stream drops its oldest messages; "new": it refuses new ones (the
    #: publisher sees an error and keeps the message, e.g. in the edge outbox).
    discard: str = "old"
    #: With ``discard="new"``: the per-subject limit refuses that subject's new messages only
    #: (one flooding node cannot fill the stream for the others).
    discard_new_per_subject: bool = False
    max_msg_size: int = -1
    max_consumers: int = -1


#: The streams slmops owns, keyed by name. Limits, and why (documented in deploy/README.md):
#: telemetry is what the cloud counts, so a full stream refuses (nodes keep windows in their
#: outbox and retry) rather than dropping what was not counted yet; the per-node subject cap
#: (100,000 windows, a week at one per 6 s) stops one node from filling it. Everything else
#: is diagnostic or history and drops its oldest.
STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(
        names.TELEMETRY_STREAM,
        (names.TELEMETRY_ALL,),
        max_age=timedelta(days=7),
        duplicate_window=timedelta(minutes=2),
        max_msgs_per_subject=100_000,
        max_bytes=4 * _GIB,
        discard="new",
        discard_new_per_subject=True,
        max_msg_size=1 * _MIB,
        max_consumers=64,
    ),
    StreamSpec(
        names.DRIFT_STREAM,
        (names.DRIFT_ALL,),
        max_age=timedelta(days=90),
        max_bytes=1 * _GIB,
        max_msg_size=1 * _MIB,
        max_consumers=256,
    ),
    StreamSpec(
        names.EVENTS_STREAM,
        (names.EVENTS_ALL,),
        max_age=timedelta(days=90),
        max_bytes=1 * _GIB,
        max_msg_size=64 * 1024,
        max_consumers=256,
    ),
    StreamSpec(
        names.STATUS_STREAM,
        (names.STATUS_ALL,),
        max_age=timedelta(days=30),
        max_msgs_per_subject=100,
        max_bytes=1 * _GIB,
        max_msg_size=256 * 1024,
        max_consumers=64,
    ),
    StreamSpec(
        names.ROLLOUT_STREAM,
        (names.ROLLOUT_ALL,),
        max_age=timedelta(days=365),
        max_bytes=1 * _GIB,
        max_msg_size=256 * 1024,
        max_consumers=256,
    ),
    StreamSpec(
        names.AUDIT_STREAM,
        (names.AUDIT_ALL,),
        max_age=timedelta(days=365 * 2),
        max_bytes=1 * _GIB,
        max_msg_size=256 * 1024,
        max_consumers=256,
    ),
    StreamSpec(
        names.DEADLETTER_STREAM,
        (names.DEADLETTER_SUBJECT, f"{names.DEADLETTER_SUBJECT}.>"),
        max_age=timedelta(days=14),
        max_bytes=512 * _MIB,
        max_msg_size=1 * _MIB + 64 * 1024,
        max_consumers=64,
    ),
)

#: KV buckets: history depth and consumer bound. Node credentials create no consumer (they
#: read by direct gets and are woken by republished puts; deploy/nats, issue 13 fault 11):
#: the bounds are for the cloud and nodes of the previous release (two watches each).
_KV_BUCKETS: tuple[tuple[str, int, int], ...] = (
    (names.ASSIGNMENTS_BUCKET, 5, 8192),
    (names.MODELS_MANIFEST_BUCKET, 1, 1024),
    # Nodes read it by direct gets and wake on core subscriptions: no consumers of theirs.
    (names.FLEETCONFIG_BUCKET, 1, 1024),
    # Every signed version kept a while for operators (nodes keep their own; history 10).
    (names.KEYS_BUCKET, 10, 1024),
)
#: Consumers of the model object store: one per download in flight, fleet-wide (nodes and
#: the cloud's recalibration loop). A download refused by the bound is retried with backoff
#: (``download_failed``), so the bound caps concurrent downloads, not delivery.
MODELS_MAX_CONSUMERS = 128


async def ensure_resources(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create every stream, KV bucket and object store slmops needs, if missing.

    Raises ``ResourceConflict`` when an existing stream cannot serve slmops,
    ``NatsUnavailable`` when JetStream does not answer, ``ProvisionError`` when the server
    refuses a creation (e.g. more replicas than servers).
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise TypeError(f"replicas must be an int, got {replicas!r}")
    if not 1 <= replicas <= _MAX_REPLICAS:
        raise ValueError(f"replicas must be between 1 and {_MAX_REPLICAS}, got {replicas!r}")
    for spec in STREAMS:
        await _ensure_stream(js, spec, replicas)
    for bucket, history, max_consumers in _KV_BUCKETS:
        await _ensure_kv(js, bucket, history, replicas, max_consumers)
    await _ensure_object_store(js, names.MODELS_BUCKET, replicas, MODELS_MAX_CONSUMERS)


def _stream_config(spec: StreamSpec, replicas: int) -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
        max_age=spec.max_age.total_seconds() if spec.max_age is not None else None,
        duplicate_window=(spec.duplicate_window.total_seconds() if spec.duplicate_window is not None else 0),
        max_msgs_per_subject=spec.max_msgs_per_subject,
        max_bytes=spec.max_bytes,
        discard=js_api.DiscardPolicy.NEW if spec.discard == "new" else js_api.DiscardPolicy.OLD,
        discard_new_per_subject=spec.discard_new_per_subject,
        max_msg_size=spec.max_msg_size,
        max_consumers=spec.max_consumers,
    )


#: Limits a stream created by an older release may lack: when the server has none (unlimited)
#: and slmops states one, it is set (an operator's own limit is never overwritten).
_TIGHTEN = ("max_age", "max_bytes", "max_msg_size", "max_consumers", "max_msgs_per_subject")


async def _ensure_stream(js: JetStreamContext, spec: StreamSpec, replicas: int) -> None:
    want = _stream_config(spec, replicas)
    have = await stream_info(js, spec.name)
    if have is None:
        try:
            with _refusal("stream", spec.name), nats_errors("stream", spec.name, url_of(js)):
                await js.add_stream(want)
        except _InUse:
            pass  # someone created it between our look and our create: judge theirs
        else:
            log.info("stream_created", stream=spec.name, subjects=list(spec.subjects))
            return
        have = await stream_info(js, spec.name)
        if have is None:  # created and deleted again within a moment: let the caller retry
            raise ProvisionError("stream", spec.name, "it vanished while being created")
    _check_stream(spec, want, have.config)
    await _tighten_stream(js, spec, want, have.config)


async def _tighten_stream(
    js: JetStreamContext, spec: StreamSpec, want: js_api.StreamConfig, have: js_api.StreamConfig
) -> None:
    """Give a stream that has no limit where slmops states one (a store written by the
    previous release) that limit. A server that cannot change ``max_consumers`` on an
    existing stream (before 2.10) refuses: the other limits are then set without it."""
    changes = {
        field: getattr(want, field)
        for field in _TIGHTEN
        if _same_limit(getattr(have, field), None) and not _same_limit(getattr(want, field), None)
    }
    if not changes:
        return
    if "max_bytes" in changes and spec.discard == "new":
        changes["discard"] = want.discard
        changes["discard_new_per_subject"] = want.discard_new_per_subject
    try:
        with nats_errors("stream", spec.name, url_of(js)):
            await js.update_stream(dataclasses.replace(have, **changes))
    except JetStreamRefused as exc:
        if "max_consumers" not in changes:
            log.warning("stream_limits_not_set", stream=spec.name, limits=list(changes), error=str(exc))
            return
        log.warning("stream_without_consumer_limit", stream=spec.name, error=str(exc))
        await _tighten_stream(js, spec, dataclasses.replace(want, max_consumers=-1), have)
        return
    log.info("stream_limits_set", stream=spec.name, limits={k: _plain(v) for k, v in changes.items()})


def _check_stream(spec: StreamSpec, want: js_api.StreamConfig, have: js_api.StreamConfig) -> None:
    if set(have.subjects or ()) != set(spec.subjects):
        raise ResourceConflict(
            "stream", spec.name, "subjects", sorted(have.subjects or ()), sorted(spec.subjects)
        )
    for field in ("storage", "retention"):
        have_v, want_v = getattr(have, field), getattr(want, field)
        if have_v != want_v:
            raise ResourceConflict("stream", spec.name, field, _plain(have_v), _plain(want_v))
    # Only limits slmops states are compared; the rest is the server's default or the
    # operator's choice.
    fields = ["num_replicas"]
    fields += ["max_age"] if spec.max_age is not None else []
    fields += ["duplicate_window"] if spec.duplicate_window is not None else []
    fields += ["max_msgs_per_subject"] if spec.max_msgs_per_subject > 0 else []
    differs = {
        field: {"have": _plain(getattr(have, field)), "want": _plain(getattr(want, field))}
        for field in fields
        if not _same_limit(getattr(have, field), getattr(want, field))
    }
    if differs:
        log.warning("stream_config_differs", stream=spec.name, differs=differs, action="kept")
    else:
        log.debug("stream_exists", stream=spec.name)


class _InUse(Exception):
    """A concurrent creator won: the resource exists now."""


@contextmanager
def _refusal(kind: str, name: str) -> Iterator[None]:
    """A refused creation is a ``ProvisionError`` (limits, permissions, cluster size...)."""
    try:
        yield
    except JetStreamRefused as exc:
        if exc.code == ERR_STREAM_NAME_IN_USE:
            raise _InUse() from exc
        raise ProvisionError(kind, name, f"{exc.description} (err_code {exc.code})") from exc


async def _ensure_kv(
    js: JetStreamContext, bucket: str, history: int, replicas: int, max_consumers: int
) -> None:
    with _refusal("kv bucket", bucket):
        # Nodes read both buckets, by direct get by subject (deploy/nats), and are woken by
        # the assignments' republished puts (names.assignment_subjects).
        republish = (
            js_api.RePublish(src=f"$KV.{bucket}.>", dest=f"{names.ASSIGNED_PREFIX}.>", headers_only=True)
            if bucket == names.ASSIGNMENTS_BUCKET
            else None
        )
        await ensure_kv(
            js, bucket, history=history, replicas=replicas, max_consumers=max_consumers, direct=True,
            republish=republish,
        )  # fmt: skip


async def _ensure_object_store(js: JetStreamContext, bucket: str, replicas: int, max_consumers: int) -> None:
    with _refusal("object store", bucket):
        await ensure_object_store(js, bucket, replicas=replicas, max_consumers=max_consumers)


def _same_limit(have: object, want: object) -> bool:
    """Compare limits where the server spells "unlimited" as 0, -1 or None."""

    def norm(v: object) -> object:
        if v is None or (isinstance(v, int | float) and v <= 0):
            return None
        return v

    return norm(have) == norm(want)


def _plain(value: object) -> object:
    """Enum members as their wire value, for messages and logs."""
    return getattr(value, "value", value)
