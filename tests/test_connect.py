"""Link connects in the background, tracks its state and survives server restarts;
connect_once fails fast."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from nats.aio.client import Client as NATS

from _nats import free_port, wait_until
from _proxy import TcpProxy
from slmops.shared.connect import Link, LinkState, connect_once
from slmops.shared.errors import NatsUnavailable
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "reconnect_time_wait": 0.1}


async def test_link_starts_without_a_server_and_does_not_block() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with anyio.fail_after(1):
        async with Link(url, name="t", **FAST) as link:  # type: ignore[arg-type]
            assert link.state in (LinkState.OFFLINE, LinkState.CONNECTING)
            await wait_until(lambda: link.statistics().attempts >= 2, timeout=0.9, what="two attempts")
            assert link.statistics().state is not LinkState.ONLINE
            with pytest.raises(NatsUnavailable, match="link is"):
                _ = link.nc
            with pytest.raises(NatsUnavailable, match="not online"):
                await link.wait_online(timeout=0.05)


async def test_link_comes_online_when_the_server_appears_and_follows_restarts(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedServer(port=port, store_dir=tmp_path / "js")
    seen: list[LinkState] = []
    async with Link(f"nats://127.0.0.1:{port}", fleet="f1", node="n1", **FAST) as link:  # type: ignore[arg-type]
        link.on_change(seen.append)
        await wait_until(lambda: link.statistics().attempts >= 1, what="a failed attempt")
        try:
            await server.start_async()
            await link.wait_online(timeout=10)
            await link.nc.flush(timeout=5)
            assert (await link.js.account_info()).limits is not None

            await server.stop_async(keep_store=True)
            await link.wait_state(LinkState.OFFLINE, timeout=10)
            with pytest.raises(NatsUnavailable):
                _ = link.nc

            await server.start_async()
            await link.wait_online(timeout=10)
            await link.nc.flush(timeout=5)
        finally:
            await server.stop_async()
    assert link.state is LinkState.OFFLINE
    assert seen.count(LinkState.ONLINE) == 2
    assert seen[-1] is LinkState.OFFLINE
    stats = link.statistics()
    assert (stats.connects, stats.disconnects) == (2, 2)  # the last stop is inside the block


async def test_link_goes_offline_when_its_proxy_is_cut(nats_server: EmbeddedServer) -> None:
    async with TcpProxy("127.0.0.1", nats_server.port) as proxy, Link(proxy.url, **FAST) as link:  # type: ignore[arg-type]
        await link.wait_online(timeout=10)
        await proxy.cut()
        await link.wait_state(LinkState.OFFLINE, timeout=10)
        await proxy.restore()
        await link.wait_online(timeout=10)


async def test_initial_attempts_back_off_exponentially_with_jitter() -> None:
    attempts: list[float] = []
    delays: list[float] = []
    done = anyio.Event()

    async def failing_connect(url: str, **options: object) -> NATS:
        attempts.append(time.monotonic())
        if len(attempts) >= 8:
            done.set()
            await anyio.sleep_forever()
        raise OSError("connection refused (simulated)")

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)
        await anyio.lowlevel.checkpoint()

    async with Link(
        "nats://unused:4222", connect=failing_connect, sleep=record_sleep, backoff_initial=1, backoff_max=8
    ) as link:
        with anyio.fail_after(5):
            await done.wait()
        assert link.state is LinkState.CONNECTING
    assert len(delays) == 7
    for n, delay in enumerate(delays, start=1):
        ceiling = min(8, 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling, (n, delay)
    assert link.statistics().attempts == 7
    assert "simulated" in (link.statistics().last_error or "")


async def test_state_subscribers_can_unsubscribe_and_a_failing_one_does_not_hurt() -> None:
    seen: list[LinkState] = []

    def broken(state: LinkState) -> None:
        raise RuntimeError("subscriber bug")

    async def failing_connect(url: str, **options: object) -> NATS:
        raise OSError("refused")

    async def no_sleep(seconds: float) -> None:
        await anyio.sleep_forever()

    link = Link("nats://x:1", connect=failing_connect, sleep=no_sleep)
    link.on_change(broken)
    unsubscribe = link.on_change(seen.append)
    async with link:
        await link.wait_state(LinkState.OFFLINE, timeout=5)
        await wait_until(lambda: seen == [LinkState.CONNECTING, LinkState.OFFLINE])
        unsubscribe()
    assert seen == [LinkState.CONNECTING, LinkState.OFFLINE]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "localhost"}, "url must be"),
        ({"url": 4222}, "url must be"),
        ({"node": "bad node"}, "node"),
        ({"backoff_initial": 0}, "backoff_initial"),
        ({"backoff_initial": 5, "backoff_max": 1}, "backoff_max"),
        ({"pending_size": -1}, "pending_size"),
    ],
)
def test_link_rejects_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"url": "nats://127.0.0.1:4222", **kwargs}
    with pytest.raises(ValueError, match=match):
        Link(**args)  # type: ignore[arg-type]


async def test_connect_once_on_a_dead_port_fails_fast_naming_the_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with anyio.fail_after(2.5), pytest.raises(NatsUnavailable) as caught:
        await connect_once(url, timeout=2)
    assert caught.value.url == url
    assert url in str(caught.value)


async def test_connect_once_connects_to_a_live_server(nats_server: EmbeddedServer) -> None:
    nc = await connect_once(nats_server.url, name="cli", fleet="f1", node="n1")
    try:
        assert nc.is_connected
        assert nc.new_inbox().startswith("_INBOX_f1.n1.")
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "nats://cloud:s3cret@a:4222,nats://cloud:s3cret@b:4222",
            "nats://cloud:***@a:4222,nats://cloud:***@b:4222",
        ),
        ("nats://mytoken@a:4222", "nats://***@a:4222"),
        ("nats://a:4222", "nats://a:4222"),
    ],
)
def test_logs_and_errors_never_show_a_password_or_token(url: str, shown: str) -> None:
    from slmops.shared.connect import redact_url

    assert redact_url(url) == shown
    assert Link(url).url == shown


@pytest.mark.anyio
async def test_connect_failure_message_hides_the_password() -> None:
    port = free_port()
    with pytest.raises(NatsUnavailable) as info:
        await connect_once(f"nats://cloud:s3cret@127.0.0.1:{port}", timeout=2)
    assert "s3cret" not in str(info.value)
