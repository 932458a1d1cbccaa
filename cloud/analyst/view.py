"""What the analyst surfaces (metrics, the HTTP API) read of the running cloud service, as
protocols: ``cloud.service.CloudService`` satisfies them, and the analyst modules need neither
the service that composes them (no import cycle, docs/architecture.md §1) nor the ingest
machinery behind it (only the state store and two figures of the ingest loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from slmops.cloud.config import CloudConfig
    from slmops.cloud.drift.detector import DriftDetector
    from slmops.cloud.ingest.state import NodeState, StateStore
    from slmops.shared.connect import Link

__all__ = ["IngestLoop", "ServiceView"]


class IngestLoop(Protocol):
    """The telemetry pull loop as the surfaces see it (``ingest.consumers.PullLoop``)."""

    @property
    def durable(self) -> str: ...
    @property
    def batch_seconds(self) -> Histogram: ...


class ServiceView(Protocol):
    """The cloud service as the analyst surfaces see it."""

    config: CloudConfig
    holder: str
    # The link's JetStream context, read directly.
    _link: Link

    @property
    def active(self) -> bool: ...
    @property
    def nodes(self) -> dict[tuple[str, str], NodeState]: ...
    @property
    def detector(self) -> DriftDetector | None: ...
    @property
    def store(self) -> StateStore | None: ...
    @property
    def ingest_loop(self) -> IngestLoop | None: ...
    def statistics(self) -> Any: ...
