"""Helpers of the fleet configuration tests: signed documents written straight into KV."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _edge_util import Keys, Statuses, edge_config
from _nats import wait_until
from slmops.edge.fleetconfig import PROBATION_S
from slmops.edge.node import EdgeNode
from slmops.shared import names
from slmops.shared.fleetconfig import FleetConfigDoc, sign_config
from slmops.shared.messages import NodeStatus


def signed(fleet: str, version: int, settings: dict[str, Any], key: Ed25519PrivateKey, **kw: Any) -> bytes:
    doc = FleetConfigDoc(fleet=fleet, version=version, settings=settings, created=datetime.now(UTC), **kw)
    return sign_config(doc, key)


async def put_raw(js: JetStreamContext, fleet: str, raw: bytes, node: str | None = None) -> None:
    kv = await js.key_value(names.FLEETCONFIG_BUCKET)
    await kv.put(names.fleetconfig_key(fleet, node), raw)


def config_state(items: list[NodeStatus], node: str, version: int, state: str) -> NodeStatus | None:
    """The first status of ``node`` saying ``state`` about ``version``."""
    for s in items:
        if s.node == node and s.config_seen == version and s.config_state == state:
            return s
    return None


WAIT = PROBATION_S * 3


@dataclass
class Env:
    """What a fleet configuration test works with: its directory, key, fleet, the session
    server (provisioned) and the statuses its fleet publishes."""

    tmp: Path
    keys: Keys
    fleet: str
    js: JetStreamContext
    url: str
    statuses: Statuses

    async def put(self, version: int, settings: dict[str, Any], node: str | None = None, **kw: Any) -> None:
        await put_raw(self.js, self.fleet, signed(self.fleet, version, settings, self.keys.key, **kw), node)

    async def wait_state(self, node: str, version: int, state: str, timeout: float = WAIT) -> NodeStatus:
        """The first status of ``node`` saying ``state`` about ``version`` (waited for)."""
        await wait_until(
            lambda: config_state(self.statuses.items, node, version, state) is not None,
            timeout,
            what=f"{node}: v{version} {state}",
        )
        found = config_state(self.statuses.items, node, version, state)
        assert found is not None
        return found

    @asynccontextmanager
    async def node(self, name: str = "n1", **kw: Any) -> AsyncIterator[EdgeNode]:
        """A running edge node of the fleet serving a test model, once online."""
        cfg = edge_config(
            self.tmp, self.keys, fleet=self.fleet, node=name, url=self.url, model=self.bundle, **kw
        )
        async with EdgeNode(cfg) as node:
            await node.link.wait_online(10)
            yield node

    @property
    def bundle(self) -> Path:
        path = self.keys.root / "bundle-v1-fp32"
        return path if path.exists() else self.keys.bundle().path
