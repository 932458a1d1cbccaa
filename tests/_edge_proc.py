"""A real ``slmops edge`` process and an HTTP client that counts what it was answered."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import IO, Any

import aiohttp
import anyio
import anyio.abc

__all__ = ["Client", "start"]


class Client:
    """Counts what the app was answered (HTTP 200s), and which answers were not durable."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base
        self.answered = self.not_durable = 0

    async def predict(self, texts: list[str]) -> None:
        async with self.session.post(self.base + "/v1/predict", json={"texts": texts}) as resp:
            body = await resp.text()
            assert resp.status == 200, body
            data = await resp.json()
        self.answered += len(data["predictions"])
        if not data["durable"]:
            self.not_durable += len(data["predictions"])

    async def burst(self, n: int, tag: str) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(self.predict, [f"alpha {tag} {i}", f"beta {tag} {i}"][: 1 + i % 2])

    async def health(self) -> dict[str, Any]:
        async with self.session.get(self.base + "/v1/health") as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data


async def start(
    args: list[str], log: Path, client: Client, env: dict[str, str] | None = None
) -> anyio.abc.Process:
    """Start the edge (``args``; output appended to ``log``; ``env`` added to this one's)
    and wait until its health answers; raises naming the exit code if it exits."""
    out: IO[bytes]
    with log.open("ab") as out:
        full = None if env is None else {**os.environ, **env}
        proc = await anyio.open_process(args, stdout=out, stderr=subprocess.STDOUT, env=full)
    with anyio.fail_after(30):
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"node exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                await client.health()
                return proc
            except (aiohttp.ClientError, AssertionError):
                await anyio.sleep(0.05)
