"""The node's object download: the exact bytes, and no subscription left behind when it is cut
short (nats-py's own ``get(writeinto=...)`` leaves one, which keeps filling memory)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from slmops.shared import names
from slmops.shared.errors import NotFound
from slmops.shared.objects import fetch_object

pytestmark = pytest.mark.anyio


def subscriptions(nc: NATS) -> int:
    # nats-py has no public count of a client's subscriptions; this is what leaks.
    subs: dict[int, Any] = nc._subs
    return len(subs)


class SlowFile(io.BytesIO):
    """A file whose writes take a while, so a timeout lands in the middle of a download."""

    def write(self, data: Any) -> int:
        time.sleep(0.05)
        return super().write(data)


class FullDisk(io.BytesIO):
    def write(self, data: Any) -> int:
        if self.tell() > 0:
            raise OSError(28, "No space left on device")
        return super().write(data)


@pytest.fixture
async def big_object(js: JetStreamContext, fleet: str) -> tuple[str, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several 128 KiB chunks and a short last one
    name = f"fetchtest/{fleet}"
    store = await js.object_store(names.MODELS_BUCKET)
    await store.put(name, data)
    return name, data


async def test_fetch_writes_exactly_the_object(js: JetStreamContext, big_object: tuple[str, bytes]) -> None:
    name, data = big_object
    out = io.BytesIO()
    assert await fetch_object(js, names.MODELS_BUCKET, name, out) == len(data)
    assert out.getvalue() == data


async def test_a_cancelled_fetch_leaves_no_subscription(
    nc: NATS, js: JetStreamContext, big_object: tuple[str, bytes]
) -> None:
    name, data = big_object
    before = subscriptions(nc)
    out = SlowFile()
    with anyio.move_on_after(0.2) as scope:
        await fetch_object(js, names.MODELS_BUCKET, name, out)
    assert scope.cancelled_caught
    assert 0 < len(out.getvalue()) < len(data)
    assert subscriptions(nc) == before


async def test_a_failed_write_leaves_no_subscription(
    nc: NATS, js: JetStreamContext, big_object: tuple[str, bytes]
) -> None:
    name, _ = big_object
    before = subscriptions(nc)
    with pytest.raises(OSError, match="No space"):
        await fetch_object(js, names.MODELS_BUCKET, name, FullDisk())
    assert subscriptions(nc) == before


async def test_a_missing_object_is_not_found(js: JetStreamContext) -> None:
    with pytest.raises(NotFound):
        await fetch_object(js, names.MODELS_BUCKET, "no/such/object", io.BytesIO())


async def test_a_resumable_download_syncs_its_data_before_its_state_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state naming how many bytes a partial download holds was written through a fixed
    temp name (``<state>.tmp``: a link planted there was written through) and, like the data,
    never fsynced: after a power cut it could claim bytes the file did not hold. Now the data
    is fsynced first, then the state replaced whole (``shared.atomic.write_atomic``)."""
    from slmops.shared import objects

    partial, state = tmp_path / "b.partial", tmp_path / f"b.partial{objects.STATE_SUFFIX}"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    state.with_name(state.name + ".tmp").symlink_to(victim)  # the old fixed temp name
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # records what is synced, in order, and syncs it
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with partial.open("ab") as f:
        objects._append(f, b"x" * 10, state, objects._Resume("nuid", 5, 10))
    assert victim.read_bytes() == b"keep"
    assert msgspec.json.decode(state.read_bytes()) == {"nuid": "nuid", "next_seq": 5, "bytes": 10}
    assert synced[0] == str(partial)  # the data, before the state naming it
    assert synced[1:] == [synced[1], str(tmp_path)]  # the state's new file, then its directory
    assert synced[1].startswith(str(tmp_path / ".b.partial"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.partial",
        state.name,
        state.name + ".tmp",
        "victim",
    ]
