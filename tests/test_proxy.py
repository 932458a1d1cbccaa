"""TcpProxy: forwards bytes, cuts the link (closing and refusing) and restores it."""

from __future__ import annotations

import anyio
import anyio.abc
import nats
import pytest

from _proxy import TcpProxy
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio


async def _read_info(port: int) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        return await stream.receive()


async def _drain_until_closed(stream: anyio.abc.SocketStream) -> bool:
    try:
        while True:
            await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True


async def test_forwards_to_the_target(nats_server: EmbeddedServer) -> None:
    async with TcpProxy("127.0.0.1", nats_server.port) as proxy:
        assert proxy.port not in (0, nats_server.port)
        assert (await _read_info(proxy.port)).startswith(b"INFO")


async def test_cut_closes_open_connections_and_refuses_new_ones(nats_server: EmbeddedServer) -> None:
    async with TcpProxy("127.0.0.1", nats_server.port) as proxy:
        async with await anyio.connect_tcp("127.0.0.1", proxy.port) as stream:
            assert (await stream.receive()).startswith(b"INFO")
            await proxy.cut()
            assert proxy.is_cut
            assert proxy.open_connections == 0
            with anyio.fail_after(5):
                assert await _drain_until_closed(stream)
        with pytest.raises(OSError, match="connection attempts failed"):
            await anyio.connect_tcp("127.0.0.1", proxy.port)

        await proxy.restore()
        assert (await _read_info(proxy.port)).startswith(b"INFO")


async def test_a_nats_client_reconnects_through_a_restored_proxy(nats_server: EmbeddedServer) -> None:
    async with TcpProxy("127.0.0.1", nats_server.port) as proxy:
        disconnected, reconnected = anyio.Event(), anyio.Event()

        async def on_disconnect() -> None:
            disconnected.set()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await nats.connect(
            proxy.url,
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        try:
            await nc.flush(timeout=5)
            with anyio.fail_after(10):
                await proxy.cut()
                await disconnected.wait()
                await proxy.restore()
                await reconnected.wait()
            await nc.flush(timeout=5)
        finally:
            await nc.close()
