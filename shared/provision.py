"""Create the JetStream resources of DESIGN §3, idempotently.

Safe to run at every service start and from several processes at once. A resource that exists
is left alone: settings that differ but do not break slmops (limits, ages, history) are logged,
never overwritten; a difference slmops cannot work with (subjects, storage, retention) raises
``ResourceConflict``. Nothing is ever deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js import errors as js_errors

from slmops.shared import names
from slmops.shared.errors import NatsUnavailable, ProvisionError, ResourceConflict

__all__ = ["STREAMS", "StreamSpec", "ensure_resources"]

log = structlog.get_logger(__name__)

# nats-server's "stream name already in use with a different configuration".
_ERR_STREAM_NAME_IN_USE = 10058
_MAX_REPLICAS = 5  # nats-server's own limit
# JetStream's HTTP-like code for "temporarily unavailable" (no leader, restarting).
_JS_UNAVAILABLE = 503


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What slmops wants of one stream. ``None`` limits mean "unlimited"."""

    name: str
    subjects: tuple[str, ...]
    max_age: timedelta | None = None
    duplicate_window: timedelta | None = None
    max_msgs_per_subject: int = -1


#: The streams slmops owns, keyed by name.
STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(
        names.TELEMETRY_STREAM,
        ("slmops.telemetry.>",),
        max_age=timedelta(days=7),
        duplicate_window=timedelta(minutes=2),
    ),
    StreamSpec(names.DRIFT_STREAM, ("slmops.drift.>",), max_age=timedelta(days=90)),
    StreamSpec(names.STATUS_STREAM, ("slmops.status.>",), max_msgs_per_subject=100),
    StreamSpec(names.ROLLOUT_STREAM, ("slmops.rollout.>",)),
    StreamSpec(
        names.DEADLETTER_STREAM,
        (names.DEADLETTER_SUBJECT, f"{names.DEADLETTER_SUBJECT}.>"),
    ),
)

#: KV buckets and their history depth.
_KV_BUCKETS: tuple[tuple[str, int], ...] = (
    (names.ASSIGNMENTS_BUCKET, 5),
    (names.MODELS_MANIFEST_BUCKET, 1),
)


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
    for bucket, history in _KV_BUCKETS:
        await _ensure_kv(js, bucket, history, replicas)
    await _ensure_object_store(js, names.MODELS_BUCKET, replicas)


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
    )


async def _ensure_stream(js: JetStreamContext, spec: StreamSpec, replicas: int) -> None:
    want = _stream_config(spec, replicas)
    have = await _stream_info(js, spec.name)
    if have is None:
        try:
            await js.add_stream(want)
        except js_errors.APIError as exc:
            if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                raise _translate(js, exc, "stream", spec.name) from exc
            # Someone created it between our look and our create: judge theirs.
        except (nats.errors.Error, OSError) as exc:
            raise _translate(js, exc, "stream", spec.name) from exc
        else:
            log.info("stream_created", stream=spec.name, subjects=list(spec.subjects))
            return
        have = await _stream_info(js, spec.name)
        if have is None:  # created and deleted again within a moment: let the caller retry
            raise ProvisionError("stream", spec.name, "it vanished while being created")
    _check_stream(spec, want, have.config)


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


async def _ensure_kv(js: JetStreamContext, bucket: str, history: int, replicas: int) -> None:
    stream = f"KV_{bucket}"
    have = await _stream_info(js, stream)
    if have is not None:
        if have.config.max_msgs_per_subject != history:
            log.warning(
                "kv_config_differs",
                bucket=bucket,
                differs={"history": {"have": have.config.max_msgs_per_subject, "want": history}},
                action="kept",
            )
        else:
            log.debug("kv_exists", bucket=bucket)
        return
    try:
        await js.create_key_value(
            js_api.KeyValueConfig(
                bucket=bucket,
                history=history,
                storage=js_api.StorageType.FILE,
                replicas=replicas,
            )
        )
    except js_errors.APIError as exc:
        if exc.err_code == _ERR_STREAM_NAME_IN_USE:
            log.info("kv_exists", bucket=bucket, note="created concurrently by someone else")
            return
        raise _translate(js, exc, "kv bucket", bucket) from exc
    except (nats.errors.Error, OSError) as exc:
        raise _translate(js, exc, "kv bucket", bucket) from exc
    log.info("kv_created", bucket=bucket, history=history)


async def _ensure_object_store(js: JetStreamContext, bucket: str, replicas: int) -> None:
    if await _stream_info(js, f"OBJ_{bucket}") is not None:
        log.debug("object_store_exists", bucket=bucket)
        return
    try:
        await js.create_object_store(
            bucket,
            js_api.ObjectStoreConfig(storage=js_api.StorageType.FILE, replicas=replicas),
        )
    except js_errors.APIError as exc:
        if exc.err_code == _ERR_STREAM_NAME_IN_USE:
            log.info("object_store_exists", bucket=bucket, note="created concurrently")
            return
        raise _translate(js, exc, "object store", bucket) from exc
    except (nats.errors.Error, OSError) as exc:
        raise _translate(js, exc, "object store", bucket) from exc
    log.info("object_store_created", bucket=bucket)


async def _stream_info(js: JetStreamContext, name: str) -> js_api.StreamInfo | None:
    try:
        return await js.stream_info(name)
    except js_errors.NotFoundError:
        return None
    except (nats.errors.Error, OSError) as exc:
        raise _translate(js, exc, "stream", name) from exc


def _translate(js: JetStreamContext, exc: BaseException, kind: str, name: str) -> Exception:
    if isinstance(exc, js_errors.APIError) and exc.code != _JS_UNAVAILABLE:
        return ProvisionError(kind, name, f"{exc.description} (err_code {exc.err_code})")
    if isinstance(exc, nats.errors.NoRespondersError):
        reason = "JetStream not enabled for this account or server (no responders)"
    elif isinstance(exc, nats.errors.TimeoutError):
        reason = f"JetStream did not answer in time while provisioning {kind} {name!r}"
    else:
        reason = f"{type(exc).__name__} while provisioning {kind} {name!r}: {exc}"
    return NatsUnavailable(_url_of(js), reason)


def _url_of(js: JetStreamContext) -> str:
    # nats-py keeps the connection on the context without a public accessor.
    nc: Any = getattr(js, "_nc", None)
    url = getattr(nc, "connected_url", None)
    if url is None:
        return "<unknown>"
    return f"{url.scheme}://{url.hostname}:{url.port}"


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
