"""The node's self-report: ``NodeStatus`` (JSON) on ``slmops.status.<fleet>.<node>``, on every
connect and every ``interval`` seconds, plus the device profile the cloud picks variants by.

Status is a core-NATS publish (the ``SLMOPS_STATUS`` stream captures it); it is sent only
while the link is online — a status is a snapshot, so a missed one is replaced by the next.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import anyio
import onnxruntime as ort
import structlog

from slmops.shared.capabilities import CAPABILITIES
from slmops.shared.connect import Link, LinkState
from slmops.shared.errors import NatsUnavailable
from slmops.shared.jetstream import nats_errors
from slmops.shared.messages import DeviceProfile, NodeStatus, encode_json
from slmops.shared.vocabulary import NodeEvent

__all__ = ["StatusReporter", "device_profile", "memory_mb"]

log = structlog.get_logger(__name__)


def memory_mb() -> int:
    """Physical memory of this device in MiB (0 when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return 0


def device_profile(data_dir: Path) -> DeviceProfile:
    """What this device is: arch, OS, cores, memory, free disk under ``data_dir``, ORT, and
    what its runtime can run (``shared.capabilities.CAPABILITIES``)."""
    try:
        free = shutil.disk_usage(data_dir).free // (1024 * 1024)
    except OSError:
        free = 0
    return DeviceProfile(
        arch=platform.machine(),
        os=f"{platform.system()} {platform.release()}",
        cores=os.cpu_count() or 0,
        memory_mb=memory_mb(),
        free_disk_mb=int(free),
        ort_version=str(ort.__version__),
        providers=list(ort.get_available_providers()),
        capabilities=list(CAPABILITIES),
    )


class StatusReporter:
    """Publishes ``snapshot(event)`` on connect and periodically; ``run`` until cancelled."""

    def __init__(
        self,
        link: Link,
        subject: str,
        snapshot: Callable[[str], NodeStatus],
        *,
        interval: float,
    ) -> None:
        self.link = link
        self.subject = subject
        self.snapshot = snapshot
        self.interval = interval
        self.sent = 0
        self._connected = anyio.Event()
        link.on_change(self._on_link)

    def _on_link(self, state: LinkState) -> None:
        if state is LinkState.ONLINE:
            self._connected.set()

    async def publish(self, status: NodeStatus) -> bool:
        """Send ``status`` now if online; returns whether it was sent."""
        try:
            with nats_errors("subject", self.subject, self.link.url):
                await self.link.nc.publish(self.subject, encode_json(status))
        except NatsUnavailable as exc:
            log.debug("status_not_sent", status_event=status.event, error=repr(exc))
            return False
        self.sent += 1
        return True

    async def run(self) -> None:
        if self.link.state is LinkState.ONLINE:
            self._connected.set()
        while True:
            with anyio.move_on_after(self.interval):
                await self._connected.wait()
            if self._connected.is_set():
                self._connected = anyio.Event()
                await self.publish(self.snapshot(NodeEvent.CONNECT))
            else:
                await self.publish(self.snapshot(NodeEvent.PERIODIC))
