"""Helpers of the fleet configuration tests: signed documents written straight into KV."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from slmops.shared import names
from slmops.shared.fleetconfig import FleetConfigDoc, sign_config
from slmops.shared.messages import NodeStatus


def signed(fleet: str, version: int, settings: dict[str, Any], key: Ed25519PrivateKey, **kw: Any) -> bytes:
    doc = FleetConfigDoc(fleet=fleet, version=version, settings=settings, created=datetime.now(UTC), **kw)
    return sign_config(doc, key)


async def put_raw(js: JetStreamContext, fleet: str, raw: bytes, node: str | None = None) -> None:
    kv = await js.key_value(names.FLEETCONFIG_BUCKET)
    await kv.put(names.fleetconfig_key(fleet, node), raw)


async def put_config(
    js: JetStreamContext,
    fleet: str,
    version: int,
    settings: dict[str, Any],
    key: Ed25519PrivateKey,
    node: str | None = None,
    **kw: Any,
) -> None:
    await put_raw(js, fleet, signed(fleet, version, settings, key, **kw), node)


def config_state(items: list[NodeStatus], node: str, version: int, state: str) -> NodeStatus | None:
    """The first status of ``node`` saying ``state`` about ``version``."""
    for s in items:
        if s.node == node and s.config_seen == version and s.config_state == state:
            return s
    return None
