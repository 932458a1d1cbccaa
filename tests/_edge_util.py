"""Helpers for the edge node tests: keys, bundles, configs, and reading telemetry back."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import nats.errors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _models import make_bundle
from _nats import model_of
from slmops.cloud.registry import Registry
from slmops.edge.config import EdgeConfig
from slmops.shared.bundle import Bundle, TrustStore
from slmops.shared.messages import NodeStatus, TelemetryAggregate, decode_telemetry
from slmops.shared.names import TELEMETRY_STREAM

__all__ = [
    "Keys",
    "Statuses",
    "distinct_total",
    "edge_cli",
    "edge_config",
    "kill",
    "read_raw",
    "read_telemetry",
    "terminate",
    "wait_counted",
]


class Keys:
    """A signing key and its public key file, plus bundles signed with it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = Ed25519PrivateKey.generate()
        self.pub = root / "fleet.pub"
        root.mkdir(parents=True, exist_ok=True)
        self.pub.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def bundle(self, version: int = 1, **kw: Any) -> Bundle:
        return make_bundle(
            self.root / f"bundle-v{version}-{kw.get('variant', 'fp32')}", self.key, version=version, **kw
        )

    async def registry(
        self, js: JetStreamContext, fleet: str, *versions: int
    ) -> tuple[Registry, list[Bundle]]:
        """A registry holding these versions' bundles (signed with this key), the fleet
        assigned the first of them; and the bundles. The model is named after ``fleet``
        (``model_of``): the registry of the session server is shared by every test, and two
        tests pushing the same name and version with their own keys would collide."""
        registry = Registry(js)
        trust = TrustStore([self.key.public_key()])
        bundles = [self.bundle(v, name=model_of(fleet)) for v in versions]
        for b in bundles:
            await registry.push(b, trust)
        await registry.assign(fleet, versions[0], model=bundles[0].manifest.name)
        return registry, bundles


class Statuses:
    """Every NodeStatus published by a fleet's nodes, as they arrive (the ``statuses``
    fixture subscribes it to the test's fleet)."""

    def __init__(self) -> None:
        self.items: list[NodeStatus] = []

    def of(self, node: str, event: str) -> list[NodeStatus]:
        return [s for s in self.items if s.node == node and s.event == event]

    def failures(self) -> list[str]:
        """Reasons of the refreshes reported as ``download_failed``."""
        return [
            s.refresh.reason
            for s in self.items
            if s.refresh is not None and not s.refresh.ok and s.refresh.code == "download_failed"
        ]

    def rejected(self) -> list[tuple[str, str]]:
        """``(code, reason)`` of every failed refresh."""
        return [
            (s.refresh.code, s.refresh.reason)
            for s in self.items
            if s.refresh is not None and not s.refresh.ok
        ]


def edge_config(
    tmp: Path, keys: Keys, *, fleet: str, node: str = "n1", url: str = "nats://127.0.0.1:1", **kw: Any
) -> EdgeConfig:
    """A fast-windowed config (no HTTP unless asked) with the keys trusted. Only pace shrinks
    (window, min count, status interval); timeouts and link backoff keep their defaults."""
    data: dict[str, Any] = {
        "fleet": fleet,
        "node": node,
        "data_dir": tmp / f"data-{node}",
        "trust": [keys.pub],
        "nats_url": url,
        "http": None,
        "window": 0.2,
        "min_count": 1,
        "status_interval": 5.0,
    }
    data.update(kw)
    if data.get("http") is None:
        data["http"] = "off"
    return EdgeConfig.build(data)


def edge_cli(url: str, fleet: str, node: str, data: Path, bundle: Path, keys: Keys, port: int) -> list[str]:
    """The command line of an ``slmops edge`` node process: JSON logs at info, the HTTP API on
    loopback ``port``, 200 ms windows of k = 1 (only pace shrinks; timeouts keep defaults)."""
    return [
        sys.executable, "-m", "slmops.cli", "--log-level", "info", "--log-json",
        "edge", "--nats", url, "--fleet", fleet, "--node", node,
        "--data", str(data), "--model", str(bundle), "--trust", str(keys.pub),
        "--http", f"127.0.0.1:{port}", "--window", "200ms", "--min-count", "1",
    ]  # fmt: skip


async def terminate(proc: anyio.abc.Process, log: Path) -> None:
    """SIGTERM a node process: it must exit 0 within 20 s (the tail of ``log`` says why not)."""
    proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(20):
        assert await proc.wait() == 0, log.read_text()[-3000:]


async def kill(proc: anyio.abc.Process) -> None:
    """SIGKILL the process unless it has exited, and reap it."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def read_raw(js: JetStreamContext, subject: str, stream: str) -> list[bytes]:
    """The data of every message on ``subject`` in ``stream``, in stream order."""
    sub = await js.pull_subscribe(subject, stream=stream)
    out: list[bytes] = []
    try:
        want = (await sub.consumer_info()).num_pending
        with anyio.fail_after(30):
            while len(out) < want:
                try:
                    msgs = await sub.fetch(min(256, want - len(out)), timeout=2)
                except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
                    continue
                for m in msgs:
                    out.append(m.data)
                    await m.ack()
    finally:
        await sub.unsubscribe()
    return out


async def read_telemetry(js: JetStreamContext, fleet: str) -> list[TelemetryAggregate]:
    """Every aggregate of ``fleet`` in SLMOPS_TELEMETRY, in stream order (duplicates kept)."""
    return [decode_telemetry(d) for d in await read_raw(js, f"slmops.telemetry.{fleet}.>", TELEMETRY_STREAM)]


async def wait_counted(js: JetStreamContext, fleet: str, n: int, timeout: float) -> None:
    """Until the distinct aggregates of ``fleet`` count at least ``n`` inferences (polled every
    0.3 s); ``TimeoutError`` after ``timeout`` s."""
    with anyio.fail_after(timeout):
        while True:
            total, _ = distinct_total(await read_telemetry(js, fleet))
            if total >= n:
                return
            await anyio.sleep(0.3)


def distinct_total(aggs: list[TelemetryAggregate]) -> tuple[int, dict[tuple[str, int], int]]:
    """Sum of ``count`` over distinct ``(node, seq)`` (asserting repeats agree)."""
    seen: dict[tuple[str, int], int] = {}
    for a in aggs:
        key = (a.node, a.seq)
        if key in seen:
            assert seen[key] == a.count, f"{key} published twice with different counts"
        seen[key] = a.count
    return sum(seen.values()), seen
