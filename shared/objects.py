"""Download one object-store object into an open file: linear, cancellable, leak-free; or into
a partial file that a later attempt resumes (``fetch_resumable``). The edge fetches bundles
with it, the cloud's recalibration loop the bundles it recalibrates.

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
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread
import msgspec
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, ObjectInfo
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE

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
    with nats_errors("object", f"{bucket}/{obj}", url):
        sub = await js.subscribe(
            OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid),
            ordered_consumer=True,
            config=ConsumerConfig(name=_consumer_name()),
        )
    try:
        messages = sub.messages
        while True:
            with nats_errors("object", f"{bucket}/{obj}", url):  # not around the write below
                try:
                    msg = await anext(messages)
                except StopAsyncIteration:  # unsubscribed under us: the size check says so
                    break
            data = msg.data
            await anyio.to_thread.run_sync(out.write, data)
            digest.update(data)
            written += len(data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        # Connection gone: the server drops the consumer on its own, nothing to undo here.
        await _unsubscribe(sub, f"{bucket}/{obj}", url)
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


def _consumer_name() -> str:
    """A name for a download's consumer: with a name (and its one filter subject) nats-py
    creates it through the filtered-subject API form
    ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``, the only one node credentials allow
    (issue 13 fault 11). A reset of nats-py's ordered consumer then fails (the name is taken)
    and the download stalls: the resumable path takes it up from its last chunk."""
    return f"dl-{os.urandom(8).hex()}"


def _load_resume(path: Path) -> _Resume | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=_Resume)
    except (OSError, msgspec.DecodeError):
        return None


def _save_resume(path: Path, state: _Resume) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    os.replace(tmp, path)


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
    stopped: each chunk's stream sequence is recorded next to it (``<partial>.state``), so a
    cut link or a restart costs only the chunk in flight. Return the object's size once the
    file holds all of it and its SHA-256 matches the object's digest (the state file is then
    removed). ``max_size``: refuse an object larger than this before fetching (the size the
    signed manifest lists). Raises ``FetchError`` (too large, no chunk for ``stall_timeout``
    seconds, short or corrupt), ``NotFound``, ``NatsUnavailable`` / ``JetStreamRefused``,
    ``OSError`` from the file; the partial file and its state stay for the next attempt.
    ``on_chunk(n)`` is called with each chunk's size."""
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
        config = (
            ConsumerConfig(
                name=_consumer_name(), deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq
            )
            if start_seq
            else ConsumerConfig(name=_consumer_name())
        )
        with nats_errors("object", where, url):
            sub = await js.subscribe(
                OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid),
                ordered_consumer=True,
                config=config,
            )
        try:
            with partial.open("ab") as f:
                while have < size:
                    with nats_errors("object", where, url):
                        try:
                            msg = await sub.next_msg(timeout=stall_timeout)
                        except TimeoutError as exc:  # nats-py's own TimeoutError is one
                            raise FetchError(
                                obj,
                                f"no data for {stall_timeout:g}s after {have} of {size} bytes (will resume)",
                            ) from exc
                    data = msg.data
                    if have + len(data) > size:
                        raise FetchError(obj, f"more than the object's {size} bytes arrived")
                    digest.update(data)
                    have += len(data)
                    resume = _Resume(str(info.nuid), msg.metadata.sequence.stream + 1, have)
                    await anyio.to_thread.run_sync(_append, f, data, state_path, resume)
                    if on_chunk is not None:
                        on_chunk(len(data))
                    if msg.metadata.num_pending == 0:
                        break
        finally:
            await _unsubscribe(sub, where, url)
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


def _append(f: BinaryIO, data: bytes, state_path: Path, resume: _Resume) -> None:
    """Data first, then the state naming it: the file is never shorter than its state says."""
    f.write(data)
    f.flush()
    _save_resume(state_path, resume)
