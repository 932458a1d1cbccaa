"""Helpers for tests that talk to a real nats-server."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["free_port", "new_fleet", "wait_until"]


def new_fleet() -> str:
    """A fleet id no other test uses, so tests sharing one server stay apart."""
    return "f_" + uuid.uuid4().hex[:10]


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
