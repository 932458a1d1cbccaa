"""Download one object-store object into an open file: linear, cancellable, leak-free; or into
a partial file that a later attempt resumes (``fetch_resumable``). The edge fetches bundles
with it, the cloud's recalibration loop the bundles it recalibrates.

The chunks are read with **batched direct gets** (``$JS.API.DIRECT.GET.OBJ_<bucket>`` with
``{"seq", "next_by_subj": "$O.<bucket>.C.<nuid>", "batch"}``, nats-server >= 2.11): the server
answers with up to ``BATCH`` chunks and an end-of-batch status, and the next request starts
after the last sequence received. No consumer is created, so a node's credentials need no
consumer right at all: it can neither take the bucket's consumer slots nor aim a push
consumer at another subject (issue 13 fault 11). One request is in flight per download, so
a batch (``BATCH`` × 128 KiB = 2 MiB) amortises the round trip.

Why not ``ObjectStore.get(name, writeinto=f)`` under a timeout: when it is cancelled (timeout,
link lost) its ordered-consumer subscription is never unsubscribed, and the server keeps
pushing the rest of the object into that subscription's pending queue for the life of the
connection. Here the reply subscription is removed in every case.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread
import msgspec
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE

from slmops.shared.atomic import write_atomic
from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.jetstream import nats_errors, url_of

__all__ = ["STATE_SUFFIX", "FetchError", "fetch_object", "fetch_resumable", "recorded_sha256"]


class FetchError(Exception):
    """The object's bytes did not arrive complete and intact (``reason`` says how)."""

    def __init__(self, obj: str, reason: str) -> None:
        self.obj = obj
        self.reason = reason
        super().__init__(f"object {obj}: {reason}")


def recorded_sha256(info: ObjectInfo) -> bytes | None:
    """The SHA-256 (32 bytes) the object's metadata records for its content: nats-py writes
    ``SHA-256=<base64url>`` when it puts the object. None when missing or malformed."""
    if not info.digest:
        return None
    want = info.digest.removeprefix(OBJ_DIGEST_TYPE).removeprefix(OBJ_DIGEST_TYPE.upper())
    try:
        return base64.urlsafe_b64decode(want)
    except ValueError:  # binascii.Error
        return None


async def fetch_object(js: JetStreamContext, bucket: str, obj: str, out: BinaryIO) -> int:
    """Write object ``obj`` of ``bucket`` into ``out``; return its size. Raises ``NotFound``
    for a missing object or bucket, ``FetchError`` for a short or corrupt transfer,
    ``NatsUnavailable`` / ``JetStreamRefused`` for the connection and the server, ``OSError``
    from writing ``out``. Put a timeout around it: cancelling is safe."""
    url = url_of(js)
    with nats_errors("object", f"{bucket}/{obj}", url):
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
    chunks = _chunks(js, bucket, str(info.nuid), 0, where=f"{bucket}/{obj}")
    try:
        async for data, _seq in chunks:
            await anyio.to_thread.run_sync(out.write, data)
            digest.update(data)
            written += len(data)
            if written >= size:
                break
    finally:
        await chunks.aclose()
    if written != size:
        raise FetchError(obj, f"received {written} bytes, the object has {size}")
    if digest.digest() != recorded_sha256(info):
        raise FetchError(obj, "SHA-256 of the received bytes does not match the object's digest")
    await anyio.to_thread.run_sync(out.flush)
    return written


async def _unsubscribe(sub: Subscription, where: str, url: str) -> None:
    """Remove the download's subscription, shielded, in at most 2 s; a connection already gone
    is fine (the server drops the consumer on its own)."""
    with (
        anyio.move_on_after(2.0, shield=True),
        contextlib.suppress(NatsUnavailable, JetStreamRefused),
        nats_errors("subscription", where, url),
    ):
        await sub.unsubscribe()


#: Suffix of the file that records how far a partial download got.
STATE_SUFFIX = ".state"


class _Resume(msgspec.Struct):
    nuid: str
    #: Stream sequence of the next chunk to ask for, and bytes already in the partial file.
    next_seq: int
    bytes: int


class _Stalled(FetchError):
    """No chunk arrived for the stall timeout."""


#: Chunks asked for per direct-get request: 16 × 128 KiB = 2 MiB per round trip.
BATCH = 16


async def _chunks(
    js: JetStreamContext,
    bucket: str,
    nuid: str,
    start_seq: int,
    *,
    where: str,
    stall_timeout: float = 60.0,
) -> AsyncGenerator[tuple[bytes, int], None]:
    """Yield ``(data, stream sequence)`` of each chunk of the object ``nuid`` from stream
    sequence ``start_seq`` on (0 = the first), by batched direct gets, until the stream has no
    more chunks of it. ``_Stalled`` (a ``FetchError``) when nothing arrives for ``stall_timeout`` seconds (a
    refused request looks like that too: its reason is on the client's ``error_cb``)."""
    nc = js._nc
    url = url_of(js)
    stream, subject = f"OBJ_{bucket}", OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid)
    inbox = nc.new_inbox()
    with nats_errors("object", where, url):
        sub = await nc.subscribe(inbox, pending_bytes_limit=4 * BATCH * _CHUNK_BOUND)
    try:
        seq = max(1, start_seq)
        while True:
            request = msgspec.json.encode({"seq": seq, "next_by_subj": subject, "batch": BATCH})
            with nats_errors("object", where, url):
                await nc.publish(f"{js._prefix}.DIRECT.GET.{stream}", request, reply=inbox)
            got = 0
            while True:
                with nats_errors("object", where, url):
                    try:
                        msg = await sub.next_msg(timeout=stall_timeout)
                    except TimeoutError as exc:  # nats-py's own TimeoutError is one
                        raise _Stalled(where, f"no data for {stall_timeout:g}s") from exc
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is not None:
                    if status == "204":  # end of this batch
                        break
                    if status == "404":  # no more chunks of this object
                        return
                    raise FetchError(where, f"direct get refused: {status} {headers.get('Description', '')}")
                got += 1
                seq = int(headers.get("Nats-Sequence", seq)) + 1
                yield msg.data, seq - 1
            if got == 0:
                return
    finally:
        await _unsubscribe(sub, where, url)


#: Seconds of download between two saves of the resume state: a restart re-fetches at most
#: what arrived in that time.
STATE_EVERY_S = 0.5

#: A chunk is 128 KiB (nats-py's object-store default); its headers add little.
_CHUNK_BOUND = 128 * 1024 + 1024


def _load_resume(path: Path) -> _Resume | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=_Resume)
    except (OSError, msgspec.DecodeError):
        return None


def _save_resume(path: Path, state: _Resume) -> None:
    write_atomic(path, msgspec.json.encode(state), prefix=f".{path.name}.")


def _sha256_prefix(path: Path, size: int) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("r+b") as f:
        f.truncate(size)
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h


async def fetch_resumable(
    js: JetStreamContext,
    bucket: str,
    obj: str,
    partial: Path,
    *,
    max_size: int | None = None,
    stall_timeout: float = 60.0,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Download object ``obj`` into the file ``partial``, resuming where an earlier attempt
    stopped: the stream sequence of the next chunk is recorded next to it (``<partial>.state``,
    at most every ``STATE_EVERY_S``), so a cut link or a restart costs only what arrived since.
    Return the object's size once the file holds all of it and its SHA-256 matches the
    object's digest (the state file is then removed). ``max_size``: refuse an object larger
    than this before fetching (the size the signed manifest lists). Raises ``FetchError``
    (too large, no chunk for ``stall_timeout`` seconds, short or corrupt), ``NotFound``,
    ``NatsUnavailable`` / ``JetStreamRefused``, ``OSError`` from the file; the partial file
    and its state stay for the next attempt. ``on_chunk(n)`` is called with each chunk's
    size."""
    url, where = url_of(js), f"{bucket}/{obj}"
    with nats_errors("object", where, url):
        store = await js.object_store(bucket)
        info = await store.get_info(obj)
    if info.options is not None and info.options.link is not None:
        raise FetchError(obj, "is a link to another object; slmops stores bundles directly")
    size = info.size or 0
    if max_size is not None and size > max_size:
        raise FetchError(obj, f"is {size} bytes, the signed manifest lists {max_size}")
    if size and (not info.nuid or not info.digest):
        raise FetchError(obj, "object metadata lacks its chunk id or digest")
    state_path = partial.with_name(partial.name + STATE_SUFFIX)
    have, start_seq, digest = await anyio.to_thread.run_sync(
        _prepare, partial, state_path, str(info.nuid), size
    )
    if have < size:
        saved_at = time.monotonic()
        chunks = _chunks(js, bucket, str(info.nuid), start_seq, where=where, stall_timeout=stall_timeout)
        try:
            with partial.open("ab") as f:
                async for data, seq in chunks:
                    if have + len(data) > size:
                        raise FetchError(obj, f"more than the object's {size} bytes arrived")
                    digest.update(data)
                    have += len(data)
                    # The state (two fsyncs and a rename) at most every STATE_EVERY_S: saved per
                    # chunk it made a fast download 2-4x slower (32 MiB: 2.0-3.7 s, not 0.8 s).
                    now = time.monotonic()
                    resume = _Resume(str(info.nuid), seq + 1, have)
                    save = now - saved_at >= STATE_EVERY_S and have < size
                    await anyio.to_thread.run_sync(_append, f, data, state_path, resume if save else None)
                    saved_at = now if save else saved_at
                    if on_chunk is not None:
                        on_chunk(len(data))
                    if have >= size:
                        break
        except _Stalled as exc:
            raise FetchError(
                obj, f"no data for {stall_timeout:g}s after {have} of {size} bytes (will resume)"
            ) from exc
        finally:
            await chunks.aclose()
    if have != size:
        await anyio.to_thread.run_sync(_discard, partial, state_path)
        raise FetchError(obj, f"received {have} bytes, the object has {size}")
    if size and digest.digest() != recorded_sha256(info):
        await anyio.to_thread.run_sync(_discard, partial, state_path)
        raise FetchError(obj, "SHA-256 of the received bytes does not match the object's digest")
    await anyio.to_thread.run_sync(lambda: state_path.unlink(missing_ok=True))
    return size


def _prepare(partial: Path, state_path: Path, nuid: str, size: int) -> tuple[int, int, hashlib._Hash]:
    """(bytes already held, stream sequence to resume at, sha256 of those bytes); a partial
    file that does not match its state (another object, shorter than recorded) starts over."""
    state = _load_resume(state_path)
    if (
        state is not None
        and state.nuid == nuid
        and 0 < state.bytes < size
        and partial.is_file()
        and partial.stat().st_size >= state.bytes
    ):
        return state.bytes, state.next_seq, _sha256_prefix(partial, state.bytes)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"")
    state_path.unlink(missing_ok=True)
    return 0, 0, hashlib.sha256()


def _discard(partial: Path, state_path: Path) -> None:
    state_path.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)


def _append(f: BinaryIO, data: bytes, state_path: Path, resume: _Resume | None) -> None:
    """``data`` appended; with ``resume``, the data fsynced and then the state naming it
    replaced whole (``write_atomic``), so even after a power cut the file is never shorter than
    its state says and the state file is never torn (it was written through a fixed temp name,
    neither fsynced). Bytes past the state's count are cut off on resume (``_prepare``)."""
    f.write(data)
    if resume is None:
        return
    f.flush()
    os.fsync(f.fileno())
    _save_resume(state_path, resume)
