"""The demo's verdict: the summary's checks and, when the story stopped, what stopped it —
the phase, the check, its figures and the log line to read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from slmops.shared.messages import RolloutEvent

if TYPE_CHECKING:
    from slmops.demo.fleet import NodeProc
    from slmops.demo.state import Story

__all__ = ["StoryFailed", "log_line", "rollout_failure", "summary"]


class StoryFailed(Exception):
    """A phase of the story did not reach its condition; its fields say which and why."""

    def __init__(self, *, phase: str, what: str, detail: str, log: str = "") -> None:
        self.phase, self.what, self.detail, self.log = phase, what, detail, log
        super().__init__(f"phase {phase}: {what}" + (f" ({detail})" if detail else ""))

    def as_dict(self) -> dict[str, str]:
        return {"phase": self.phase, "what": self.what, "detail": self.detail, "log": self.log}


def log_line(path: Path, event: str) -> str:
    """``"<path>:<line>"`` of the first JSON log line with ``"event": "<event>"``, or the path."""
    needle = f'"event": "{event}"'
    try:
        with path.open(errors="replace") as f:
            for i, line in enumerate(f, 1):
                if needle in line:
                    return f"{path}:{i}"
    except OSError:
        pass
    return str(path)


def rollout_failure(story: Story, ended: RolloutEvent, cloud_log: Path) -> StoryFailed:
    """The rollout rolled back (or was aborted): name each failed gate with both figures."""
    from slmops.cloud.rollout.gates import GateResult, describe

    failed = next(
        (e for e in story.rollout_events if e.state == "gate_failed" and e.rollout == ended.rollout), None
    )
    checks = []
    for g in (failed.gates if failed else {}).values():
        try:
            result = msgspec.convert(g, GateResult)
        except msgspec.ValidationError:
            continue
        if result.outcome == "fail":
            checks.append(describe(result))
    event = "rollout_gate_failed" if failed is not None else f"rollout_{ended.state}"
    return StoryFailed(
        phase=f"{story.number}/{story.total} {story.phase}",
        what=f"the rollout of v{ended.version} {ended.state.replace('_', ' ')} at stage {ended.stage + 1} "
        f"({ended.percent}%)",
        detail="; ".join(checks) or ended.reason,
        log=log_line(cloud_log, event),
    )


def summary(
    nodes_requested: int, story: Story, nodes: list[NodeProc], counted: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for n in nodes:
        model = n.health.get("model") or {}
        rows.append(
            {
                "node": n.name,
                "served": n.served,
                "counted": counted.get(n.name, {}).get("inferences"),
                "model_version": model.get("version"),
                "failed_requests": n.failed,
            }
        )
    versions: list[int] = sorted({int(r["model_version"]) for r in rows if r["model_version"] is not None})
    # Drift only: the baseline's announcement and a skew report (issue 14) open too, but they
    # are not the change the story shows.
    opened = [e for e in story.drift_events if e.state == "opened" and e.kind == "drift"]
    checks = story.checks
    checks["every_phase_completed"] = story.failure is None
    checks["served_equals_counted"] = bool(rows) and all(
        r["counted"] == r["served"] and r["served"] > 0 for r in rows
    )
    checks["no_failed_requests"] = all(r["failed_requests"] == 0 for r in rows)
    checks["offline_node_buffered"] = story.offline_outbox_peak > 0
    checks["outboxes_drained"] = bool(nodes) and all(n.health.get("outbox") == 0 for n in nodes)
    checks["drift_event_opened"] = bool(opened)
    checks["rollout_completed"] = any(e.state == "completed" for e in story.rollout_events)
    checks["new_version_rolled_out"] = (
        bool(versions) and max(versions) > 1 and all(r["model_version"] == max(versions) for r in rows)
    )
    return {
        "ok": all(checks.values()),
        "failure": story.failure,
        "phases": [{"phase": f"{i}/{story.total}", "title": t, "seconds": s} for i, t, s in story.done],
        "nodes": rows,
        "drift_events": len(story.drift_events),
        "drift_opened": len(opened),
        "drift_event_example": msgspec.to_builtins(opened[0]) if opened else None,
        "rollout_events": len(story.rollout_events),
        "rollouts": [
            {"version": e.version, "state": e.state, "stage": e.stage + 1, "reason": e.reason}
            for e in story.rollout_events
            if e.state in ("completed", "rolled_back", "aborted")
        ],
        "versions": versions,
        "model_cached": story.model_cached,
        "bytes_sent": story.bytes_sent,
        "bytes_raw_equivalent": sum(n.raw_bytes for n in nodes),
        "checks": checks,
        "notes": story.notes[-20:],
        "seconds": round(story.elapsed(), 1),
        "nodes_requested": nodes_requested,
        "workdir": str(story.workdir) if story.workdir else None,
    }
