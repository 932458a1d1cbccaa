"""What the demo's story holds as it runs: its phases and the ``Story`` record the live view,
the report and the summary read (here, so those modules need not import the story runner)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from slmops.shared.messages import DriftEvent, RolloutEvent

__all__ = ["PHASES", "Story"]

PHASES = (
    "building the model",
    "starting the cloud and {nodes} nodes",
    "steady state",
    "{offline} loses its link, keeps serving and buffering",
    "traffic shifts on {shifted} of {nodes} nodes: waiting for a drift event",
    "the cloud recalibrates and rolls out a new version: waiting for its first stage",
    "{offline} reconnects: drains its buffer, installs the new version with the last stage",
    "draining: every inference counted once",
)


@dataclass
class Story:
    """What happened, for the live view and the summary."""

    phase: str = "starting"
    #: 1-based number of the current phase (0 before the first).
    number: int = 0
    total: int = len(PHASES)
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    #: (number, title, seconds it took) of every finished phase.
    done: list[tuple[int, str, float]] = field(default_factory=list)
    drift_events: list[DriftEvent] = field(default_factory=list)
    rollout_events: list[RolloutEvent] = field(default_factory=list)
    bytes_sent: int = 0
    messages_sent: int = 0
    offline_outbox_peak: int = 0
    model_cached: bool | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    failure: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    workdir: Path | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started
