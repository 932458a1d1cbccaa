"""What the rollout controller knows of a fleet's nodes: their last status, which are alive,
which run a rollout's version, and which refused it or left it on their own."""

from __future__ import annotations

import collections

from slmops.cloud.rollout.state import NodeEntry, RolloutState
from slmops.shared.messages import NodeStatus, QualityScore
from slmops.shared.vocabulary import NodeEvent

__all__ = ["NodeView"]

#: A node's report counts for a stage when it was stored at most this long before the node's
#: assignment (server times on both sides; the margin covers the controller's own clock).
_SKEW_S = 60.0
#: Refresh outcomes the node retries by itself: not a verdict on the version.
_TRANSIENT = frozenset({"download_failed"})


class NodeView:
    """Fed every ``NodeStatus``; answers questions about a fleet's nodes. Never blocks."""

    def __init__(self, *, node_ttl_s: float = 900.0) -> None:
        self.node_ttl_s = node_ttl_s
        self._status: dict[str, dict[str, NodeStatus]] = collections.defaultdict(dict)
        self._rejects: dict[tuple[str, str], NodeStatus] = {}
        #: When each status was stored (server time, epoch seconds): statuses are ordered and
        #: nodes judged alive by it, never by the node's own clock (issue 13 fault 6).
        self._stored: dict[int, float] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._status.values())

    def _at(self, status: NodeStatus) -> float:
        """A status's server time; the node's clock only for one fed without it."""
        at = self._stored.get(id(status))
        return at if at is not None else status.time.timestamp()

    def observe(self, status: NodeStatus, stored: float | None = None) -> None:
        """``stored``: the JetStream timestamp of the status message (epoch seconds)."""
        if stored is not None:
            self._stored[id(status)] = stored
        nodes = self._status[status.fleet]
        old = nodes.get(status.node)
        if old is None or self._at(status) >= self._at(old):
            nodes[status.node] = status
            if old is not None and old is not self._rejects.get((status.fleet, status.node)):
                self._stored.pop(id(old), None)
        elif stored is not None:
            self._stored.pop(id(status), None)
        # A rejection is reported once (the node's next periodic status no longer carries
        # it), so it is kept here until the node reports another.
        r = status.refresh
        if r is not None and not r.ok and r.code not in _TRANSIENT:
            before = self._rejects.get((status.fleet, status.node))
            self._rejects[(status.fleet, status.node)] = status
            if before is not None and before is not nodes.get(status.node):
                self._stored.pop(id(before), None)
            if stored is not None:
                self._stored[id(status)] = stored

    def live(self, fleet: str, now: float) -> dict[str, NodeStatus]:
        """Nodes of ``fleet`` that reported within ``node_ttl_s`` (server time) and did not
        shut down."""
        return {
            n: s
            for n, s in self._status.get(fleet, {}).items()
            if s.event != NodeEvent.SHUTDOWN and self._at(s) >= now - self.node_ttl_s
        }

    def is_live(self, fleet: str, node: str, now: float) -> bool:
        """Whether ``node`` is one of ``live(fleet, now)`` (without building that dict)."""
        s = self._status.get(fleet, {}).get(node)
        return s is not None and s.event != NodeEvent.SHUTDOWN and self._at(s) >= now - self.node_ttl_s

    def statuses(self, fleet: str) -> dict[str, NodeStatus]:
        """Every node's last status in ``fleet`` (alive or not), by node."""
        return dict(self._status.get(fleet, {}))

    def status(self, fleet: str, node: str) -> NodeStatus | None:
        """The node's last status (alive or not)."""
        return self._status.get(fleet, {}).get(node)

    def failures(self, state: RolloutState) -> dict[str, str]:
        """Nodes that rejected the version or left it on their own, from their statuses."""
        found = dict(state.failures)
        for node, entry in state.nodes.items():
            if node not in found and (why := self.failure(state, node, entry)) is not None:
                found[node] = why
        return found

    def failure(self, state: RolloutState, node: str, entry: NodeEntry) -> str | None:
        """Why ``node`` counts as failed in ``state`` since its assignment (``entry``):
        it rejected the version or left it on its own; None when it did neither."""
        since = entry.assigned_at - _SKEW_S
        rejected = self._rejects.get((state.fleet, node))
        r = rejected.refresh if rejected is not None and self._at(rejected) >= since else None
        if r is not None and r.model.name == state.model and r.model.version == state.version:
            return f"rejected: {r.code or 'error'} {r.reason}".strip()
        s = self._status.get(state.fleet, {}).get(node)
        if s is None or self._at(s) < since:
            return None
        if (
            s.previous_model is not None
            and s.previous_model.version == state.version
            and s.previous_model.name == state.model
            and (s.model is None or s.model.version != state.version)
        ) or _left_beside(s, state):
            return "rolled back on the node (local health limits)"
        return None

    def quality(self, state: RolloutState, nodes: set[str]) -> dict[str, QualityScore | None]:
        """Each of ``nodes``' reported quality-set score for the rollout's version (None: not
        reported yet)."""
        statuses = self._status.get(state.fleet, {})
        return {n: quality_of(statuses.get(n), state.model, state.version) for n in sorted(nodes)}

    def installed(self, state: RolloutState) -> set[str]:
        """Nodes of the rollout whose last status shows its version served: as the default
        model, or beside it (``NodeStatus.models``, models side by side)."""
        return {n for n in state.nodes if self.is_installed(state, n)}

    def is_installed(self, state: RolloutState, node: str) -> bool:
        """Whether the node's last status shows the rollout's version served."""
        s = self._status.get(state.fleet, {}).get(node)
        want = (state.model, state.version)
        return s is not None and any(
            (m.name, m.version) == want for m in [*([s.model] if s.model else []), *s.models]
        )


def quality_of(status: NodeStatus | None, model: str, version: int) -> QualityScore | None:
    """The quality-set score ``status`` reports for ``model`` version ``version``, if any."""
    if status is None:
        return None
    return next((q for q in status.quality if (q.model.name, q.model.version) == (model, version)), None)


def _left_beside(s: NodeStatus, state: RolloutState) -> bool:
    """Whether the node left the rollout's version of a model it serves side by side: that
    version is the model's previous one and another is current (``NodeStatus.models``)."""
    if not state.side_by_side:
        return False
    want = (state.model, state.version)
    was = any((p.name, p.version) == want for p in s.previous_models)
    now = next((m for m in s.models if m.name == state.model), None)
    return was and now is not None and now.version != state.version
