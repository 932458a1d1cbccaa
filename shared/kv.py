"""Listing the keys of a KV bucket, without nats-py's ``KeyValue.keys()``.

``keys()`` (and a ``watch`` used to list) replays the bucket through an ordered consumer and
ends at its "no more" marker, which it can send too early: it decides from ``consumer_info``
that nothing is pending while the entries already delivered still wait for its callback (seen
here as ``registry assign: ... (versions: [])`` right after three versions were pushed, on a
loaded machine). ``kv_keys`` asks the stream for its subjects instead (``STREAM.INFO`` with a
subject filter): one request, nothing to race. The answer holds every key written and not
purged, deleted ones too (their last entry is a delete marker): read a key to know.
``kv_values`` reads them all through one watch, which it ends only once it has seen every
listed key (not at the watch's own "no more" marker), instead of one request per key.
A client that may not create consumers (an analyst, ``consumerless``) gets ``kv_stream`` and
``kv_values`` by one ``STREAM.MSG.GET`` (last by subject) per key instead of the watch, and
``kv_get`` the same way (the cloud's own buckets allow no direct get).
``kv_get`` reads one key through the NATS boundary (``shared.jetstream.nats_errors``), None
for a missing or deleted key.

``kv_get_direct`` reads one key with a direct get BY SUBJECT (``$JS.API.DIRECT.GET.KV_<bucket>.
$KV.<bucket>.<key>``, no request body), the only KV read node credentials allow: the key is in
the subject, where permissions see it, so a node can read its own assignment and not another's
(``STREAM.MSG.GET`` carries the key in the body; issue 13 fault 11). It needs no bind
(``STREAM.INFO``) and does not depend on how nats-py judges the bucket.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.kv import KeyValue

from slmops.shared.errors import NotFound
from slmops.shared.jetstream import consumerless, nats_errors, url_of

__all__ = ["kv_get", "kv_get_direct", "kv_keys", "kv_stream", "kv_values"]

#: KV operation header and the operations that mean "no value" (nats-py's ``KV_OP`` values).
_KV_OP = "KV-Operation"
_NO_VALUE = ("DEL", "PURGE")


async def kv_get(
    kv: KeyValue, key: str, url: str = "<nats>", *, kind: str = "kv key", timeout: float = 10.0
) -> KeyValue.Entry | None:
    """The key's latest entry, or None when the key is missing or deleted. ``kind`` and ``url``
    name it in errors. Raises ``NatsUnavailable`` (also when no answer comes within ``timeout``
    seconds) or ``JetStreamRefused``."""
    js = getattr(kv, "_js", None)
    if js is not None and consumerless(js):  # an analyst: a message get, not nats-py's
        bucket: str = kv._name
        with anyio.fail_after(timeout):
            msg = await _direct(js, bucket, key, direct=False)
        return None if msg is None else KeyValue.Entry(bucket, key, msg.data or b"", msg.seq, 0, 0, None)
    try:
        with nats_errors(kind, key, url), anyio.fail_after(timeout):
            return await kv.get(key)
    except NotFound:
        return None


async def kv_get_direct(js: JetStreamContext, bucket: str, key: str) -> bytes | None:
    """The current value of ``key`` in KV ``bucket``, or None when it was never written, was
    deleted or purged. One direct get by subject (module docstring); the bucket's stream
    must allow direct gets (``shared.jetstream.ensure_kv`` makes it so). Raises
    ``NatsUnavailable`` when it does not (no responders; also a missing stream), on a timeout
    (also what a permission refusal looks like) and for other request errors."""
    msg = await _direct(js, bucket, key)
    return None if msg is None else msg.data or b""


async def _direct(js: JetStreamContext, bucket: str, key: str, *, direct: bool = True) -> RawStreamMsg | None:
    """``kv_get_direct``'s message (its sequence is the key's revision), None for no value;
    ``direct=False``: by ``STREAM.MSG.GET`` (last by subject; the leader answers, and buckets
    without direct gets, the cloud's own, allow it), what ``consumerless`` clients read with."""
    try:
        with nats_errors("kv key", f"{bucket}/{key}", url_of(js)):
            msg = await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}", direct=direct)
    except NotFound:
        return None
    return None if (msg.headers or {}).get(_KV_OP) in _NO_VALUE else msg


async def kv_keys(js: JetStreamContext, bucket: str, key_filter: str = ">") -> list[str]:
    """Sorted keys of KV ``bucket`` matching the subject-style ``key_filter`` (``>``, ``a.*``).

    Raises ``NotFound`` when the bucket does not exist, ``NatsUnavailable`` for the request.
    The server returns up to 100,000 subjects per request; buckets here hold far fewer.
    """
    prefix = f"$KV.{bucket}."
    with nats_errors("kv bucket", bucket, url_of(js)):
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + key_filter)
    subjects = info.state.subjects or {}
    return sorted(s[len(prefix) :] for s in subjects if s.startswith(prefix))


async def kv_values(
    js: JetStreamContext, bucket: str, key_filter: str = ">", *, timeout: float = 5.0
) -> dict[str, bytes]:
    """The current value of every live key of KV ``bucket`` matching ``key_filter`` (deleted
    and purged keys are left out). Raises ``NotFound`` for a missing bucket and
    ``NatsUnavailable`` when the watch stalls for ``timeout`` seconds or the link fails."""
    want = set(await kv_keys(js, bucket, key_filter))
    out: dict[str, bytes] = {}
    async for key, value in kv_stream(js, bucket, key_filter, want, timeout=timeout):
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


async def kv_stream(
    js: JetStreamContext, bucket: str, key_filter: str, want: set[str], *, timeout: float = 5.0
) -> AsyncGenerator[tuple[str, bytes | None]]:
    """``(key, value)`` as one watch of KV ``bucket`` delivers them (in stream order, not key
    order), value None for a deleted or purged key, until every key of ``want`` (from
    ``kv_keys``; emptied as it goes) was seen. Raises as ``kv_values``."""
    if not want:
        return
    if consumerless(js):  # an analyst: one message get per key, in key order, no watch
        for key in sorted(want):
            want.discard(key)
            msg = await _direct(js, bucket, key, direct=False)
            yield key, None if msg is None else msg.data or b""
        return
    with nats_errors("kv bucket", bucket, url_of(js)):
        kv = await js.key_value(bucket)
        watcher = await kv.watch(key_filter)  # last entry per key, delete markers included
    try:
        while want:
            with nats_errors("kv bucket", bucket, url_of(js)):
                entry = await watcher.updates(timeout=timeout)  # type: ignore[no-untyped-call]
            if entry is None:  # the watch's "initial values done": not trusted, see above
                continue
            want.discard(entry.key)
            is_put = entry.operation is None and entry.value is not None
            yield entry.key, entry.value if is_put else None
    finally:
        with nats_errors("kv bucket", bucket, url_of(js)):
            await watcher.stop()  # type: ignore[no-untyped-call]
