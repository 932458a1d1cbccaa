"""Child processes of the benchmarks (and of the tests that run real nodes): waiting until a
node's HTTP API answers, and stopping a process with a signal and a grace period."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

import aiohttp
import anyio
import anyio.abc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["bench_key", "edge_command", "status_mb", "stop_process", "wait_healthy"]


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


def bench_key(tmp: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A throwaway signing key for a bench run and its public key written to ``tmp/fleet.pub``
    (what the bench's nodes trust)."""
    key = Ed25519PrivateKey.generate()
    pub = tmp / "fleet.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub


def status_mb(pid: int, field: str) -> int:
    """``field`` ("VmRSS", "VmHWM") of process ``pid`` in MB, from ``/proc/<pid>/status`` (0 if absent)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return 0


def edge_command(data_dir: Path, node: str, model: Path, pub: Path, port: int) -> list[str]:
    """``slmops edge`` for a bench: fleet "bench", no reachable NATS (telemetry stays in the
    outbox), ``model`` trusted by ``pub``, HTTP on ``127.0.0.1:port``, 1 s windows, k = 1."""
    return [
        sys.executable, "-m", "slmops.cli", "--log-level", "warning", "edge",
        "--nats", "nats://127.0.0.1:1", "--fleet", "bench", "--node", node,
        "--data", str(data_dir), "--model", str(model), "--trust", str(pub),
        "--http", f"127.0.0.1:{port}", "--window", "1s", "--min-count", "1",
    ]  # fmt: skip
