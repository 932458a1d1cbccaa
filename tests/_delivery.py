"""The world of a model-delivery test (fixture ``d`` in ``conftest.py``): the session
server (provisioned), a registry on it, a fleet and a model name of the test's own, a signing
key the nodes trust, the test's directory and the statuses its fleet publishes. Each test of
``test_models_refresh.py``, ``test_models_delivery.py`` and ``test_capabilities.py`` pushed,
assigned and configured its node with the same lines; they are here once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from _edge_util import Keys, Statuses, edge_config
from slmops.cloud.registry import Registry
from slmops.edge.config import EdgeConfig
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import Bundle, TrustStore
from slmops.shared.messages import Assignment, ModelRef
from slmops.shared.server import EmbeddedServer


@dataclass
class Delivery:
    js: JetStreamContext
    server: EmbeddedServer
    tmp: Path
    keys: Keys
    fleet: str
    model: str
    statuses: Statuses
    registry: Registry = field(init=False)

    def __post_init__(self) -> None:
        self.registry = Registry(self.js)

    @property
    def trust(self) -> TrustStore:
        """The registry-side trust: the test's signing key."""
        return TrustStore([self.keys.key.public_key()])

    async def push(self, *bundles: Bundle) -> None:
        """``models push`` of each bundle, with push's own checks."""
        for b in bundles:
            await self.registry.push(b, self.trust)

    async def assign(self, version: int, **kw: Any) -> Assignment:
        """Assign ``version`` of the test's model (``model=`` in ``kw`` names another)."""
        kw.setdefault("model", self.model)
        return await self.registry.assign(self.fleet, version, **kw)

    def config(self, *, url: str | None = None, **kw: Any) -> EdgeConfig:
        """``_edge_util.edge_config`` of a node of the fleet on the session server (or ``url``)."""
        return edge_config(self.tmp, self.keys, fleet=self.fleet, url=url or self.server.url, **kw)

    def ref(self, version: int, **kw: Any) -> ModelRef:
        """The test model's reference at ``version``."""
        return ModelRef(name=self.model, version=version, **kw)


def serving(node: EdgeNode) -> ModelRef | None:
    """The reference of the node's default model, None while it has none."""
    current = node.models.current
    return None if current is None else current.ref
