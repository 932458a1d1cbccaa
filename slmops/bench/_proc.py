"""Child processes of the benchmarks (and of the tests that run real nodes): waiting until a
node's HTTP API answers, and stopping a process with a signal and a grace period."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import aiohttp
import anyio
import anyio.abc

__all__ = ["stop_process", "wait_healthy"]


async def wait_healthy(
    session: aiohttp.ClientSession,
    base: str,
    *,
    proc: anyio.abc.Process | None = None,
    log: Path | None = None,
    timeout: float = 60.0,
    interval: float = 0.1,
) -> None:
    """Poll ``base + "/v1/health"`` every ``interval`` s until it answers 200. Raises
    ``RuntimeError`` (naming ``log``, the process's output, if given) as soon as ``proc`` has
    exited, and ``TimeoutError`` after ``timeout`` s."""
    with anyio.fail_after(timeout):
        while True:
            if proc is not None and proc.returncode is not None:
                see = f": see {log}" if log is not None else ""
                raise RuntimeError(f"{base}: the process exited with {proc.returncode}{see}")
            try:
                async with session.get(base + "/v1/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await anyio.sleep(interval)


async def stop_process(proc: anyio.abc.Process, sig: int, grace: float = 30.0) -> None:
    """Send ``sig`` and wait for the exit; SIGKILL once ``grace`` s have passed without one."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.Signals(sig))
    with anyio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
