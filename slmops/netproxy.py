"""A loopback TCP proxy whose link can be cut and restored: the fault tests (docs/architecture.md §8) and the
demo put one between a node and NATS to cut that node's link for real.

async with TcpProxy("127.0.0.1", server.port) as proxy:
    ... connect a node to proxy.url ...
    await proxy.cut()      # open connections are closed, new ones refused
    await proxy.restore()  # listening again, on the same port
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", rate: float | None = None
    ) -> None:
        """``rate``: bytes per second each direction of each connection may carry (a slow
        steady link); None = as fast as loopback."""
        if not isinstance(target_port, int) or not 0 < target_port < 65536:
            raise ValueError(f"target_port must be 1..65535, got {target_port!r}")
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate!r}")
        self.rate = rate
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self._port = 0
        self._tg: anyio.abc.TaskGroup | None = None
        #: While listening: the listener's cancel scope and the event set once it closed.
        self._listening: tuple[anyio.CancelScope, anyio.Event] | None = None
        self._conns: set[anyio.CancelScope] = set()
        self._conn_closed = anyio.Event()
        self.accepted = 0  #: connections accepted in total

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{self.listen_host}:{self._port}"

    @property
    def is_cut(self) -> bool:
        return self._listening is None

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._listen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._group()
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)

    def _group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("the proxy is not open: use `async with TcpProxy(...)`")
        return self._tg

    async def cut(self) -> None:
        """Close every open connection and stop listening (new connects are refused)."""
        if self._listening is not None:
            scope, closed = self._listening
            self._listening = None
            scope.cancel()
            await closed.wait()
        for scope in list(self._conns):
            scope.cancel()
        with anyio.fail_after(5):
            while self._conns:
                self._conn_closed = anyio.Event()
                await self._conn_closed.wait()

    async def restore(self) -> None:
        """Listen again on the same port."""
        if self._listening is None:
            await self._listen()

    async def _listen(self) -> None:
        tg = self._group()
        listener = await anyio.create_tcp_listener(local_host=self.listen_host, local_port=self._port)
        self._port = listener.extra(SocketAttribute.local_port)
        self._listening = (anyio.CancelScope(), anyio.Event())
        tg.start_soon(self._serve, listener, *self._listening)

    async def _serve(
        self,
        listener: anyio.abc.Listener[anyio.abc.SocketStream],
        scope: anyio.CancelScope,
        closed: anyio.Event,
    ) -> None:
        try:
            with scope:
                async with listener:
                    await listener.serve(self._handle, task_group=self._group())
        finally:
            closed.set()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        scope = anyio.CancelScope()
        self._conns.add(scope)
        try:
            with scope:
                async with client:
                    try:
                        upstream = await anyio.connect_tcp(*self.target)
                    except OSError:
                        return
                    async with upstream, anyio.create_task_group() as tg:
                        tg.start_soon(self._pipe, client, upstream, tg.cancel_scope, self.rate)
                        tg.start_soon(self._pipe, upstream, client, tg.cancel_scope, self.rate)
        finally:
            self._conns.discard(scope)
            self._conn_closed.set()

    @staticmethod
    async def _pipe(
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        both: anyio.CancelScope,
        rate: float | None = None,
    ) -> None:
        # Either side ending (EOF or error) ends the whole connection: NATS needs no half-close.
        try:
            async for chunk in src:
                if rate is None:
                    await dst.send(chunk)
                    continue
                for i in range(0, len(chunk), 1024):  # small pieces: a steady, not bursty, rate
                    piece = chunk[i : i + 1024]
                    await dst.send(piece)
                    await anyio.sleep(len(piece) / rate)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            both.cancel()
