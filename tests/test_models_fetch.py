"""The node's object download: the exact bytes, and no subscription left behind when it is cut
short (nats-py's own ``get(writeinto=...)`` leaves one, which keeps filling memory)."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import anyio
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
