"""The NATS boundary (shared.jetstream) against the real server: nats-py's errors come out as
ours, ensure_kv is idempotent and concurrent-safe and keeps an existing bucket's config; the
one backoff helper."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from slmops.shared import jetstream
from slmops.shared.backoff import Backoff
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NoResponders, NotFound, WrongLastSequence
from slmops.shared.jetstream import ensure_kv, nats_errors, stream_info


@pytest.mark.anyio
async def test_kv_errors_come_out_as_ours(js: JetStreamContext, fleet: str) -> None:
    kv = await ensure_kv(js, f"t_{fleet}")
    with pytest.raises(NotFound) as missing, nats_errors("kv key", "absent"):
        await kv.get("absent")
    assert (missing.value.kind, missing.value.name) == ("kv key", "absent")
    revision = await kv.create("k", b"1")
    await kv.update("k", b"2", last=revision)
    with pytest.raises(WrongLastSequence), nats_errors("kv key", "k"):
        await kv.update("k", b"3", last=revision)
    assert issubclass(WrongLastSequence, JetStreamRefused)
    with pytest.raises(NotFound), nats_errors("kv bucket", "nope"):
        await js.key_value(f"nope_{fleet}")


class _Recorder:
    """Stands in for the module's structlog logger: keeps each event and its fields (a
    process-wide log level set by another test cannot hide them)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append({"event": event, "level": level, **kw})


@pytest.mark.anyio
async def test_ensure_kv_is_concurrent_safe_and_keeps_an_existing_config(
    js: JetStreamContext, fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"c_{fleet}"
    made = []

    async def one() -> None:
        made.append(await ensure_kv(js, bucket, history=3))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    assert len(made) == 4
    recorder = _Recorder()
    monkeypatch.setattr(jetstream, "log", recorder)
    await ensure_kv(js, bucket, history=1, ttl=60)
    logs = recorder.events
    info = await stream_info(js, f"KV_{bucket}")
    assert info is not None
    assert info.config.max_msgs_per_subject == 3  # kept, not overwritten
    (differs,) = [e for e in logs if e["event"] == "kv_config_differs"]
    assert set(differs["differs"]) == {"history", "ttl"}
    assert await stream_info(js, f"KV_absent_{fleet}") is None


def test_backoff_doubles_to_its_cap_with_optional_equal_jitter() -> None:
    plain = Backoff(0.5, 4.0)
    assert [plain.delay(n) for n in range(6)] == [0.5, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert [plain.next(), plain.next(), plain.next()] == [0.5, 1.0, 2.0]
    plain.reset()
    assert plain.next() == 0.5
    jittered = Backoff(1.0, 8.0, jitter=True, rng=random.Random(7))
    for n in range(1, 8):
        ceiling = min(8.0, 2.0 ** (n - 1))
        assert ceiling / 2 <= jittered.delay(n) <= ceiling
    with pytest.raises(ValueError, match="initial"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match="cap"):
        Backoff(2, 1)


@pytest.mark.anyio
async def test_service_request_names_a_missing_service_and_a_silent_one(nc: NATS) -> None:
    """No subscriber → ``NoResponders`` naming the subject (at once, not after the timeout); a
    subscriber that never answers → ``NatsUnavailable`` saying so; an answer comes back."""
    with anyio.fail_after(2):
        with pytest.raises(NoResponders, match=r"no responders on svc\.none"):
            await jetstream.service_request(nc, "svc.none", b"x", timeout=10)
    silent = await nc.subscribe("svc.silent")
    with pytest.raises(NatsUnavailable, match=r"no answer on svc\.silent within 0\.5 s") as caught:
        await jetstream.service_request(nc, "svc.silent", b"x", timeout=0.5)
    assert not isinstance(caught.value, NoResponders)
    await silent.unsubscribe()

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data.upper())

    await nc.subscribe("svc.echo", cb=echo)
    assert (await jetstream.service_request(nc, "svc.echo", b"ok", timeout=5)).data == b"OK"
