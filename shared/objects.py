"""Download one object-store object into an open file: linear, cancellable, leak-free. Used
by the cloud (the recalibration loop reads the bundles it recalibrates).

Why not ``ObjectStore.get(name, writeinto=f)`` under a timeout: it is linear too, but when it is
cancelled (timeout, link lost) its ordered-consumer subscription is never unsubscribed, and the
server keeps pushing the rest of the object into that subscription's pending queue (up to
nats-py's 128 MiB default) for the life of the connection — on a flaky edge link, every timed-out
attempt would leak up to one model's size of memory and bandwidth. This is the same protocol
(``get_info``, an ordered consumer on the chunk subject, the SHA-256 digest of the meta), with
the subscription removed in every case.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from typing import BinaryIO

import anyio
import anyio.to_thread
import nats.errors
from nats.js import JetStreamContext
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE

__all__ = ["FetchError", "fetch_object"]


class FetchError(Exception):
    """The object's bytes did not arrive complete and intact (``reason`` says how)."""

    def __init__(self, obj: str, reason: str) -> None:
        self.obj = obj
        self.reason = reason
        super().__init__(f"object {obj}: {reason}")


async def fetch_object(js: JetStreamContext, bucket: str, obj: str, out: BinaryIO) -> int:
    """Write object ``obj`` of ``bucket`` into ``out``; return its size. Raises nats-py's
    ``NotFoundError`` for a missing object, ``FetchError`` for a short or corrupt transfer,
    nats/OS errors for the connection. Put a timeout around it: cancelling is safe."""
    store = await js.object_store(bucket)
    info = await store.get_info(obj)
    if info.options is not None and info.options.link is not None:
        raise FetchError(obj, "is a link to another object; slmops stores bundles directly")
    size = info.size or 0
    if size == 0:
        return 0
    if not info.nuid or not info.digest:
        raise FetchError(obj, "object metadata lacks its chunk id or digest")
    digest = hashlib.sha256()
    written = 0
    sub = await js.subscribe(
        OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid), ordered_consumer=True
    )
    try:
        async for msg in sub.messages:
            data = msg.data
            await anyio.to_thread.run_sync(out.write, data)
            digest.update(data)
            written += len(data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        # Connection gone: the server drops the consumer on its own, nothing to undo here.
        with anyio.move_on_after(2.0, shield=True), contextlib.suppress(nats.errors.Error, OSError):
            await sub.unsubscribe()
    if written != size:
        raise FetchError(obj, f"received {written} bytes, the object has {size}")
    want = info.digest.removeprefix(OBJ_DIGEST_TYPE).removeprefix(OBJ_DIGEST_TYPE.upper())
    if digest.digest() != base64.urlsafe_b64decode(want):
        raise FetchError(obj, "SHA-256 of the received bytes does not match the object's digest")
    await anyio.to_thread.run_sync(out.flush)
    return written
