"""``shared.kv.kv_keys`` lists a bucket's keys from the stream's subjects (real server)."""

from __future__ import annotations

import pytest
from nats.js import JetStreamContext
from nats.js import errors as js_errors

from slmops.shared.errors import NotFound
from slmops.shared.kv import kv_keys, kv_values

pytestmark = pytest.mark.anyio


async def test_every_key_put_is_listed_at_once_filtered_and_deleted_ones_too(
    js: JetStreamContext, fleet: str
) -> None:
    """Right after 300 puts all 300 keys are listed (nats-py's keys() could end its replay
    early); a subject filter narrows the list; a deleted key stays listed (reading it says
    it is gone), a missing bucket is NotFound."""
    bucket = f"KVT_{fleet}"
    kv = await js.create_key_value(bucket=bucket, history=1)
    try:
        for i in range(300):
            await kv.put(f"{'a' if i % 3 else 'b'}.k{i:03d}", b"x")
        keys = await kv_keys(js, bucket)
        assert len(keys) == 300
        assert keys == sorted(keys)
        assert keys[0] == "a.k001"
        b_keys = await kv_keys(js, bucket, "b.*")
        assert b_keys == [f"b.k{i:03d}" for i in range(0, 300, 3)]
        await kv.delete("b.k000")
        assert "b.k000" in await kv_keys(js, bucket, "b.*")
        with pytest.raises(js_errors.KeyNotFoundError):  # nats-py's answer for a deleted key
            await kv.get("b.k000")
        with pytest.raises(NotFound):
            await kv_keys(js, f"KVT_{fleet}_missing")
    finally:
        await js.delete_key_value(bucket)


async def test_values_of_live_keys_come_through_one_watch_deleted_ones_left_out(
    js: JetStreamContext, fleet: str
) -> None:
    """``kv_values``: every live key's latest value, filtered; deleted keys are left out; an
    empty bucket gives {} and a missing one NotFound."""
    bucket = f"KVV_{fleet}"
    kv = await js.create_key_value(bucket=bucket, history=2)
    try:
        assert await kv_values(js, bucket) == {}
        for i in range(50):
            await kv.put(f"{'a' if i % 2 else 'b'}.k{i:02d}", b"old")
            await kv.put(f"{'a' if i % 2 else 'b'}.k{i:02d}", str(i).encode())
        await kv.delete("a.k01")
        values = await kv_values(js, bucket, "a.*")
        assert values == {f"a.k{i:02d}": str(i).encode() for i in range(3, 50, 2)}
        assert len(await kv_values(js, bucket)) == 49
        with pytest.raises(NotFound):
            await kv_values(js, f"KVV_{fleet}_missing")
    finally:
        await js.delete_key_value(bucket)
