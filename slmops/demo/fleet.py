"""The demo's moving parts as real processes: the cloud and N edge nodes, each node behind its
own loopback TCP proxy so the story can cut one node's link and restore it."""

from __future__ import annotations

import os
import socket
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc

from slmops.netproxy import TcpProxy

__all__ = ["Fleet", "NodeProc", "free_port", "slmops_cmd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def slmops_cmd() -> list[str]:
    """How to run the ``slmops`` command in a child process (same interpreter)."""
    return [sys.executable, "-m", "slmops.cli", "--log-json"]


@dataclass
class NodeProc:
    name: str
    data_dir: Path
    http_port: int
    proxy: TcpProxy
    log_path: Path
    process: anyio.abc.Process | None = None
    served: int = 0
    failed: int = 0
    raw_bytes: int = 0
    health: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class Fleet:
    """Starts and stops the cloud and node processes; talks to nodes over their HTTP API."""

    def __init__(self, root: Path, nats_url: str, nats_port: int, fleet: str) -> None:
        self.root = root
        self.nats_url = nats_url
        self.nats_port = nats_port
        self.fleet = fleet
        self.nodes: list[NodeProc] = []
        self.cloud: anyio.abc.Process | None = None
        self.cloud_log = root / "cloud.log"
        self._session: aiohttp.ClientSession | None = None
        self._files: list[Any] = []
        self._stack = AsyncExitStack()

    async def start_cloud(self, extra: list[str]) -> None:
        out = self.cloud_log.open("wb")
        self._files.append(out)
        self.cloud = await anyio.open_process(
            [
                *slmops_cmd(),
                "cloud",
                "--nats",
                self.nats_url,
                "--state",
                str(self.root / "cloud"),
                "--fleet",
                self.fleet,
                *extra,
            ],
            stdout=out,
            stderr=out,
        )

    async def start_node(
        self, i: int, *, model: Path | None, trust: Path, window: str, min_count: int
    ) -> NodeProc:
        name = f"node-{i}"
        proxy = await self._stack.enter_async_context(TcpProxy("127.0.0.1", self.nats_port))
        node = NodeProc(
            name=name,
            data_dir=self.root / "nodes" / name,
            http_port=free_port(),
            proxy=proxy,
            log_path=self.root / f"{name}.log",
        )
        args = [
            *slmops_cmd(),
            "edge",
            "--nats",
            f"nats://127.0.0.1:{proxy.port}",
            "--fleet",
            self.fleet,
            "--node",
            name,
            "--data",
            str(node.data_dir),
            "--trust",
            str(trust),
            "--http",
            f"127.0.0.1:{node.http_port}",
            "--window",
            window,
            "--min-count",
            str(min_count),
        ]
        if model is not None:
            args += ["--model", str(model)]
        out = node.log_path.open("wb")
        self._files.append(out)
        env = {**os.environ, "SLMOPS_EDGE_STATUS_INTERVAL": "2s"}
        node.process = await anyio.open_process(args, stdout=out, stderr=out, env=env)
        self.nodes.append(node)
        return node

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def wait_ready(self, node: NodeProc, timeout: float = 60.0) -> None:
        """Wait until the node answers /v1/health with a model installed."""
        with anyio.fail_after(timeout):
            while True:
                if node.process is not None and node.process.returncode is not None:
                    raise RuntimeError(
                        f"{node.name} exited with {node.process.returncode}:\n{node.log_tail()}"
                    )
                try:
                    h = await self.health(node)
                    if h.get("model"):
                        return
                except (aiohttp.ClientError, OSError):
                    pass
                await anyio.sleep(0.2)

    async def health(self, node: NodeProc) -> dict[str, Any]:
        async with self.session.get(node.base_url + "/v1/health") as r:
            r.raise_for_status()
            h: dict[str, Any] = await r.json()
        node.health = h
        return h

    async def predict(self, node: NodeProc, texts: list[str]) -> list[dict[str, Any]]:
        async with self.session.post(node.base_url + "/v1/predict", json={"texts": texts}) as r:
            if r.status != 200:
                node.failed += len(texts)
                return []
            body: dict[str, Any] = await r.json()
        node.served += len(texts)
        preds: list[dict[str, Any]] = body.get("predictions", [])
        return preds

    async def stop(self) -> None:
        """Terminate every process (kill after 10 s), then close the link proxies."""
        with anyio.CancelScope(shield=True):
            if self._session is not None:
                await self._session.close()
            procs = [p for p in [*(n.process for n in self.nodes), self.cloud] if p is not None]
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            for p in procs:
                with anyio.move_on_after(10):
                    await p.wait()
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            for f in self._files:
                f.close()
        # The proxies' task groups were entered outside the shield: leave them outside it.
        await self._stack.aclose()
