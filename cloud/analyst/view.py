"""What the analyst surfaces (metrics, the HTTP API) read of the running cloud service, as a
protocol: ``cloud.service.CloudService`` satisfies it, and the analyst modules need not import
the service that composes them (no import cycle, docs/architecture.md §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from slmops.cloud.config import CloudConfig
    from slmops.cloud.drift.detector import DriftDetector
    from slmops.cloud.ingest.apply import Applier
    from slmops.cloud.ingest.consumers import TelemetryIngest
    from slmops.cloud.ingest.state import NodeState
    from slmops.shared.connect import Link

__all__ = ["ServiceView"]


class ServiceView(Protocol):
    """The cloud service as the analyst surfaces see it."""

    config: CloudConfig
    holder: str
    # Parts the surfaces read directly (the applier's state, the ingest loop's counters, the
    # link's JetStream context); None on a standby.
    _applier: Applier | None
    _ingest: TelemetryIngest | None
    _link: Link

    @property
    def active(self) -> bool: ...
    @property
    def nodes(self) -> dict[tuple[str, str], NodeState]: ...
    @property
    def detector(self) -> DriftDetector | None: ...
    def statistics(self) -> Any: ...
