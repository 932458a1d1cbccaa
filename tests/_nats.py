"""Helpers for tests that talk to a real nats-server."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio
import nats
from nats.js import JetStreamContext
from nats.js import api as js_api

from slmops.shared.messages import decode_json
from slmops.shared.provision import ensure_resources

if TYPE_CHECKING:
    from slmops.cloud.trust import FleetDir
    from slmops.shared.server import EmbeddedServer

__all__ = [
    "free_port",
    "jetstream",
    "model_of",
    "new_fleet",
    "operator_server",
    "read_json",
    "read_stored",
    "wait_until",
]

T = TypeVar("T")


def new_fleet() -> str:
    """A fleet id no other test uses, so tests sharing one server stay apart."""
    return "f_" + uuid.uuid4().hex[:10]


def model_of(fleet: str) -> str:
    """The model name of the test that owns ``fleet`` (from ``new_fleet``). The session
    server's registry and object store are shared by every test, and a name/version/variant
    holds one bundle for good: a test pushing into them must use a name no other test uses."""
    return "m" + fleet.removeprefix("f_")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS may hand it out again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; ``TimeoutError`` after ``timeout``.

    For conditions nobody signals with an event; prefer an event where there is one.
    """
    try:
        with anyio.fail_after(timeout):
            while True:
                result = predicate()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return
                await anyio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"{what} not met within {timeout}s") from None


async def read_json(js: JetStreamContext, subject: str, type_: type[T], n: int) -> list[T]:
    """The first ``n`` JSON messages stored on ``subject`` (wildcards allowed), decoded as
    ``type_``, read from the start by an ordered consumer; ``TimeoutError`` if fewer than ``n``
    arrive within 10 s."""
    out: list[T] = []
    config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    sub = await js.subscribe(subject, ordered_consumer=True, config=config)
    try:
        with anyio.fail_after(10):
            async for msg in sub.messages:
                out.append(decode_json(msg.data, type_))
                if len(out) >= n:
                    break
    finally:
        await sub.unsubscribe()
    return out


async def read_stored(js: JetStreamContext, stream: str, subject: str, type_: type[T]) -> list[T]:
    """Every JSON message ``stream`` holds on ``subject`` (wildcards allowed) right now, in
    stream order, decoded as ``type_``."""
    info = await js.stream_info(stream, subjects_filter=subject)
    total = sum((info.state.subjects or {}).values())
    return await read_json(js, subject, type_, total) if total else []


@asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    """JetStream over a connection of its own to ``url`` (a server a test started itself),
    with slmops' streams and buckets provisioned; the connection closes with the block."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_resources(js)
        yield js
    finally:
        await nc.close()


@asynccontextmanager
async def operator_server(directory: Path) -> AsyncIterator[tuple[EmbeddedServer, FleetDir]]:
    """A real nats-server in operator mode (decentralized JWT auth, full resolver) on a free
    loopback port: a fleet directory made by ``FleetDir.init(directory)``, the server run
    with its ``server.conf``, slmops' resources provisioned as the fleet's cloud user."""
    from slmops.cloud.trust import FleetDir
    from slmops.shared.server import EmbeddedServer

    fleet_dir = FleetDir.init(directory)
    server = EmbeddedServer(extra_args=["-c", str(fleet_dir.server_conf)])
    await server.start_async()
    try:
        nc = await nats.connect(server.url, user_credentials=str(fleet_dir.cloud_creds))
        try:
            await ensure_resources(nc.jetstream())
        finally:
            await nc.close()
        yield server, fleet_dir
    finally:
        await server.stop_async()
