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
- no responders (JetStream off for the account), timeouts, a closed connection, ``OSError``
  → ``NatsUnavailable``
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NotFound, WrongLastSequence

__all__ = [
    "ERR_STREAM_NAME_IN_USE",
    "ensure_kv",
    "ensure_object_store",
    "nats_errors",
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
    except (nats.errors.Error, OSError) as exc:
        raise NatsUnavailable(url, f"{type(exc).__name__} on {kind} {name!r}: {exc}") from exc


def _code_and_text(exc: js_errors.APIError, default: str) -> tuple[int | None, str]:
    # nats-py builds its KV and object-store errors without the API error's fields.
    code = getattr(exc, "err_code", None)
    text = getattr(exc, "description", None) or default
    return code, str(text)


def url_of(js: JetStreamContext) -> str:
    """The server URL ``js`` is connected to, for messages (``<unknown>`` if not connected)."""
    # nats-py keeps the connection on the context without a public accessor.
    nc: Any = getattr(js, "_nc", None)
    url = getattr(nc, "connected_url", None)
    if url is None:
        return "<unknown>"
    return f"{url.scheme}://{url.hostname}:{url.port}"


async def stream_info(js: JetStreamContext, name: str) -> js_api.StreamInfo | None:
    """The stream's info, or None when it does not exist. Raises ``NatsUnavailable``."""
    try:
        with nats_errors("stream", name, url_of(js)):
            return await js.stream_info(name)
    except NotFound:
        return None


async def ensure_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 1,
    ttl: float | None = None,
    replicas: int = 1,
) -> KeyValue:
    """The KV bucket, created (file storage) if missing; idempotent and safe against a
    concurrent creator. An existing bucket is kept as it is: a history or TTL that differs
    from what is asked is logged (``kv_config_differs``), never overwritten. Raises
    ``NatsUnavailable`` or ``JetStreamRefused``."""
    url = url_of(js)
    have = await stream_info(js, f"KV_{bucket}")
    if have is None:
        config = js_api.KeyValueConfig(
            bucket=bucket, history=history, ttl=ttl, storage=js_api.StorageType.FILE, replicas=replicas
        )
        try:
            with nats_errors("kv bucket", bucket, url):
                kv = await js.create_key_value(config)
        except JetStreamRefused as exc:
            if exc.code != ERR_STREAM_NAME_IN_USE:
                raise
            log.info("kv_exists", bucket=bucket, note="created concurrently by someone else")
        else:
            log.info("kv_created", bucket=bucket, history=history, ttl=ttl)
            return kv
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
    with nats_errors("kv bucket", bucket, url):
        return await js.key_value(bucket)


async def ensure_object_store(js: JetStreamContext, bucket: str, *, replicas: int = 1) -> None:
    """The object store, created (file storage) if missing; idempotent, concurrent-safe.
    Raises ``NatsUnavailable`` or ``JetStreamRefused``."""
    if await stream_info(js, f"OBJ_{bucket}") is not None:
        log.debug("object_store_exists", bucket=bucket)
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
    log.info("object_store_created", bucket=bucket)
