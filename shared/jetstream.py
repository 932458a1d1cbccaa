"""The one boundary between slmops and nats-py's JetStream API (as httpcore's
``map_exceptions``): ``nats_errors`` turns what nats-py raises into the project's exception
tree (``shared.errors``), and the idempotent ``ensure_*`` helpers create or check the
streams, KV buckets and object stores. Callers catch only our errors, and only where they
decide something per error.

nats-py → ours (``nats_errors``):

- ``NotFoundError`` (stream, bucket, key, deleted key, object) → ``NotFound``
- ``KeyWrongLastSequenceError`` (a lost compare-and-set) → ``WrongLastSequence``
- any other JetStream API error → ``JetStreamRefused(kind, name, code, description)``, except
  code 503 (no leader, restarting) → ``NatsUnavailable``
- nats-py's own JetStream checks (invalid key or bucket name, bad object metadata, digest
  mismatch) → ``JetStreamRefused`` with ``code`` None; no stream answering a publish →
  ``NatsUnavailable``
- no responders (JetStream off for the account), timeouts, a closed connection, ``OSError``
  → ``NatsUnavailable``
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NoResponders, NotFound, WrongLastSequence

__all__ = [
    "DEFAULT_MAX_CONSUMERS",
    "ERR_STREAM_NAME_IN_USE",
    "consumerless",
    "ensure_kv",
    "ensure_object_store",
    "is_connection_error",
    "is_nats_error",
    "msgs_by_gets",
    "nats_errors",
    "read_by_gets",
    "replay",
    "service_request",
    "stored_at",
    "stream_info",
    "url_of",
]

log = structlog.get_logger(__name__)

#: nats-server's err_code for "stream name already in use with a different configuration".
ERR_STREAM_NAME_IN_USE = 10058
#: JetStream's HTTP-like code for "temporarily unavailable" (no leader, restarting).
_JS_UNAVAILABLE = 503


@contextmanager
def nats_errors(kind: str, name: str, url: str = "<nats>") -> Iterator[None]:
    """Translate nats-py errors raised in the block (module docstring). ``kind`` and ``name``
    say what was being done to what (``"kv bucket"``, ``"slmops_fleet"``), for the message."""
    try:
        yield
    except js_errors.KeyWrongLastSequenceError as exc:
        raise WrongLastSequence(kind, name, *_code_and_text(exc, "wrong last sequence")) from exc
    except js_errors.NotFoundError as exc:
        raise NotFound(kind, name, *_code_and_text(exc, "not found")) from exc
    except js_errors.APIError as exc:
        code, text = _code_and_text(exc, type(exc).__name__)
        if getattr(exc, "code", None) == _JS_UNAVAILABLE:
            raise NatsUnavailable(url, f"JetStream unavailable for {kind} {name!r}: {text}") from exc
        raise JetStreamRefused(kind, name, code, text) from exc
    except nats.errors.NoRespondersError as exc:
        raise NatsUnavailable(
            url, "JetStream not enabled for this account or server (no responders)"
        ) from exc
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise NatsUnavailable(url, f"JetStream did not answer in time ({kind} {name!r})") from exc
    except js_errors.Error as exc:
        if isinstance(exc, js_errors.NoStreamResponseError):  # no stream answered (yet)
            raise NatsUnavailable(url, f"{type(exc).__name__} on {kind} {name!r}: {exc}") from exc
        # nats-py's own checks (invalid key or name, bad object meta, digest mismatch...).
        raise JetStreamRefused(kind, name, None, f"{type(exc).__name__}: {exc}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise NatsUnavailable(url, f"{type(exc).__name__} on {kind} {name!r}: {exc}") from exc


async def service_request(nc: NATS, subject: str, payload: bytes, *, timeout: float) -> Msg:
    """A core NATS request to a service (not JetStream) on ``subject``; its reply. Raises
    ``NoResponders`` when nobody serves the subject, ``NatsUnavailable`` when no answer came
    within ``timeout`` seconds or the connection failed."""
    url = url_of(nc)
    try:
        return await nc.request(subject, payload, timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise NoResponders(url, subject) from exc
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise NatsUnavailable(url, f"no answer on {subject} within {timeout:g} s") from exc
    except (nats.errors.Error, OSError) as exc:
        raise NatsUnavailable(url, f"{type(exc).__name__} on request to {subject}: {exc}") from exc


#: What ``nats_errors`` maps to ``NatsUnavailable`` at the least (nats-py's own, timeouts, sockets).
_TRANSPORT_ERRORS = (nats.errors.Error, TimeoutError, OSError)


def is_nats_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one that ``nats_errors`` translates (nats-py's errors, a timeout, an
    ``OSError``): for code that only classifies an error from an injected connection factory,
    e.g. to log an expected refusal quietly. Code that calls nats-py uses ``nats_errors``."""
    return isinstance(exc, _TRANSPORT_ERRORS)


# The connection is gone or not there yet (a drop, a refused or failed connect), as opposed to
# a server that answered with an error (permissions, auth).
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    nats.errors.NoServersError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection is gone or not there yet (a drop, a refused
    connect), not that a server refused something (a permission violation, bad credentials)."""
    return isinstance(exc, _CONNECTION_ERRORS)


def _code_and_text(exc: js_errors.APIError, default: str) -> tuple[int | None, str]:
    # nats-py builds its KV and object-store errors without the API error's fields.
    code = getattr(exc, "err_code", None)
    text = getattr(exc, "description", None) or default
    return code, str(text)


def url_of(conn: JetStreamContext | NATS) -> str:
    """The server URL a client, or a JetStream context's client, is connected to, for
    messages (``<unknown>`` if not connected)."""
    # nats-py keeps the connection on the context without a public accessor.
    nc: Any = conn if isinstance(conn, NATS) else getattr(conn, "_nc", None)
    url = getattr(nc, "connected_url", None)
    if url is None:
        return "<unknown>"
    return f"{url.scheme}://{url.hostname}:{url.port}"


def stored_at(msg: Msg) -> datetime | None:
    """When JetStream stored ``msg`` (its metadata timestamp), or None for a message without
    JetStream metadata (not from a stream, or a reply subject nats-py cannot parse)."""
    try:
        return msg.metadata.timestamp
    except (AttributeError, ValueError, IndexError, nats.errors.Error):
        return None


async def stream_info(js: JetStreamContext, name: str) -> js_api.StreamInfo | None:
    """The stream's info, or None when it does not exist. Raises ``NatsUnavailable``."""
    try:
        with nats_errors("stream", name, url_of(js)):
            return await js.stream_info(name)
    except NotFound:
        return None


#: Consumers a KV bucket's or object store's stream may hold unless told otherwise. Node
#: credentials create consumers only on the buckets ``shared.provision`` sizes for them (issue
#: 13 fault 11); on the others only the cloud does, and a listing (``kv_values``) is a watch
#: whose consumer outlives it by the server's 5 s inactivity threshold, so a busy cloud holds
#: dozens at once (64 was reached by the test suite's rollouts).
DEFAULT_MAX_CONSUMERS = 1024


def _kv_stream_config(
    bucket: str,
    history: int,
    ttl: float | None,
    replicas: int,
    max_consumers: int,
    direct: bool,
    republish: js_api.RePublish | None = None,
) -> js_api.StreamConfig:
    """The stream nats-py's ``create_key_value`` would make (nats-py 2.16), with a consumer
    bound, which its ``KeyValueConfig`` cannot carry, ``allow_direct`` and ``republish`` as
    asked."""
    return js_api.StreamConfig(
        republish=republish,
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        allow_direct=direct,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=js_api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, ttl) if ttl else 120.0,
        max_age=ttl,
        max_consumers=max_consumers,
        max_msgs=-1,
        max_msgs_per_subject=history,
        num_replicas=replicas,
        storage=js_api.StorageType.FILE,
    )


async def ensure_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 1,
    ttl: float | None = None,
    replicas: int = 1,
    max_consumers: int = DEFAULT_MAX_CONSUMERS,
    direct: bool = False,
    republish: js_api.RePublish | None = None,
) -> KeyValue:
    """The KV bucket, created (file storage, at most ``max_consumers`` consumers) if missing;
    idempotent and safe against a concurrent creator. ``direct``: allow direct gets, the
    reads by subject node credentials are limited to (``shared.kv.kv_get_direct``); any
    replica may answer them, so a read can lag a write by moments in a cluster — the cloud's
    own buckets leave it off (reads from the leader). An existing bucket keeps its history
    and TTL (a difference is logged, ``kv_config_differs``); one made by an older release
    without a consumer bound, or without direct gets when ``direct``, gets them
    (``_tighten``). ``republish``: the stream republishes each put (a bucket without it gets
    it). Raises ``NatsUnavailable`` or ``JetStreamRefused``."""
    url = url_of(js)
    have = await stream_info(js, f"KV_{bucket}")
    if have is None:
        config = _kv_stream_config(bucket, history, ttl, replicas, max_consumers, direct, republish)
        try:
            with nats_errors("kv bucket", bucket, url):
                await js.add_stream(config)
        except JetStreamRefused as exc:
            if exc.code != ERR_STREAM_NAME_IN_USE:
                raise
            log.info("kv_exists", bucket=bucket, note="created concurrently by someone else")
        else:
            log.info("kv_created", bucket=bucket, history=history, ttl=ttl, max_consumers=max_consumers)
    else:
        differs: dict[str, dict[str, object]] = {}
        if have.config.max_msgs_per_subject != history:
            differs["history"] = {"have": have.config.max_msgs_per_subject, "want": history}
        if ttl is not None and abs((have.config.max_age or 0.0) - ttl) > 1e-3:
            differs["ttl"] = {"have": have.config.max_age, "want": ttl}
        if differs:
            log.warning("kv_config_differs", bucket=bucket, differs=differs, action="kept")
        else:
            log.debug("kv_exists", bucket=bucket)
        await _tighten(
            js, "kv bucket", bucket, have.config, max_consumers, direct=direct, republish=republish
        )
    with nats_errors("kv bucket", bucket, url):
        return await js.key_value(bucket)


async def ensure_object_store(
    js: JetStreamContext, bucket: str, *, replicas: int = 1, max_consumers: int = DEFAULT_MAX_CONSUMERS
) -> None:
    """The object store, created (file storage, at most ``max_consumers`` consumers) if
    missing; idempotent, concurrent-safe; an existing one without a consumer bound gets it.
    Raises ``NatsUnavailable`` or ``JetStreamRefused``."""
    have = await stream_info(js, f"OBJ_{bucket}")
    if have is not None:
        log.debug("object_store_exists", bucket=bucket)
        await _tighten(js, "object store", bucket, have.config, max_consumers)
        return
    config = js_api.ObjectStoreConfig(storage=js_api.StorageType.FILE, replicas=replicas)
    try:
        with nats_errors("object store", bucket, url_of(js)):
            await js.create_object_store(bucket, config)
    except JetStreamRefused as exc:
        if exc.code != ERR_STREAM_NAME_IN_USE:
            raise
        log.info("object_store_exists", bucket=bucket, note="created concurrently")
        return
    # nats-py's ObjectStoreConfig cannot carry the bound: set it right after creation.
    made = await stream_info(js, f"OBJ_{bucket}")
    if made is not None:
        await _tighten(js, "object store", bucket, made.config, max_consumers)
    log.info("object_store_created", bucket=bucket, max_consumers=max_consumers)


async def _tighten(
    js: JetStreamContext,
    kind: str,
    name: str,
    have: js_api.StreamConfig,
    max_consumers: int,
    *,
    direct: bool = False,
    republish: js_api.RePublish | None = None,
) -> None:
    """Set a consumer bound (and with ``direct`` turn on direct gets, with ``republish`` the
    republishing of puts) on a bucket's stream that lacks it (made by an older release or by
    nats-py's defaults). An operator's own bound is kept. A server that refuses the change
    (older servers cannot change ``max_consumers``) is logged."""
    changes: dict[str, Any] = {}
    if direct and not have.allow_direct:
        changes["allow_direct"] = True
    if republish is not None and (have.republish is None or have.republish.dest != republish.dest):
        changes["republish"] = republish
    if max_consumers > 0 and (have.max_consumers is None or have.max_consumers <= 0):
        changes["max_consumers"] = max_consumers
    if not changes:
        return
    try:
        with nats_errors(kind, name, url_of(js)):
            await js.update_stream(dataclasses.replace(have, **changes))
    except JetStreamRefused as exc:
        log.warning("bucket_limits_not_set", bucket=name, limits=changes, error=str(exc))
        return
    log.info("bucket_limits_set", bucket=name, limits=changes)


def consumerless(js: JetStreamContext) -> bool:
    """True when ``js``'s client may not create consumers: its inbox is an analyst's own
    (``_INBOX.U<user key>``, ``shared.connect.own_inbox``; ``cloud.trust.permissions`` gives
    analysts message and direct gets but no consumer, whose delivery subject it cannot judge)."""
    prefix = getattr(getattr(js, "_nc", None), "_inbox_prefix", b"")
    return bytes(prefix).startswith(b"_INBOX.U")


async def replay(
    js: JetStreamContext,
    stream: str,
    subject: str,
    on_msg: Callable[[Msg], None],
    *,
    url: str = "<nats>",
    timeout: float = 3.0,
) -> None:
    """Hand every message of ``stream`` on ``subject`` to ``on_msg``, oldest first, through an
    ordered consumer; done when none is pending, or when none arrives within ``timeout``
    seconds. ``on_msg`` handles its own decode errors. Raises ``NatsUnavailable``. A client
    that may not create consumers (``consumerless``) reads by message gets instead."""
    if consumerless(js):
        async for raw in msgs_by_gets(js, stream, subject, url):
            on_msg(Msg(js._nc, subject=raw.subject or subject, data=raw.data or b"", headers=raw.headers))
        return
    with nats_errors("stream", stream, url):
        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
    try:
        while True:
            with nats_errors("stream", stream, url):
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except TimeoutError:  # nats-py's own TimeoutError is one
                    break  # nothing more within the timeout: the replay is over
            on_msg(msg)
            if msg.metadata.num_pending == 0:
                break
    finally:
        with (
            contextlib.suppress(NatsUnavailable, JetStreamRefused),
            nats_errors("subscription", subject, url),
        ):
            await sub.unsubscribe()


async def read_by_gets(
    js: JetStreamContext,
    stream: str,
    subject: str,
    take: Callable[[str, bytes], None],
    url: str,
    *,
    last: int = 0,
) -> None:
    """Every message of ``subject`` in ``stream`` handed to ``take(subject, data)`` in stream
    order, by message gets (``msgs_by_gets``). Raises as it does."""
    async for raw in msgs_by_gets(js, stream, subject, url, last=last):
        take(raw.subject or subject, raw.data or b"")


async def msgs_by_gets(
    js: JetStreamContext, stream: str, subject: str, url: str, *, last: int = 0, since: datetime | None = None
) -> AsyncIterator[js_api.RawStreamMsg]:
    """Every message of ``subject`` in ``stream`` by ``STREAM.MSG.GET`` (next by subject from a
    sequence), in stream order; one request per message, no consumer (what an analyst may read,
    ``cloud.trust.permissions``). ``last`` > 0: stop after that stream sequence; ``since``:
    skip messages stored before it (they are still fetched). Raises ``NatsUnavailable`` or
    ``JetStreamRefused``."""
    seq = 1
    while not last or seq <= last:
        with nats_errors("stream", stream, url):
            try:
                raw = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except js_errors.NotFoundError:
                return
        if raw.seq is not None and last and raw.seq > last:
            return
        if since is None or raw.time is None or raw.time >= since:
            yield raw
        if raw.seq is None:
            return
        seq = raw.seq + 1
