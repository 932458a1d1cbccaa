"""What the rollout controller knows of a fleet's nodes: their last status, which are alive,
which run a rollout's version, and which refused it or left it on their own."""

from __future__ import annotations

import collections

from slmops.cloud.rollout.state import RolloutState
from slmops.shared.messages import NodeStatus

__all__ = ["NodeView"]

#: Node clocks may run behind the controller's: a node's report counts for a stage when it is
#: stamped at most this long before the node's assignment.
_SKEW_S = 60.0
#: Refresh outcomes the node retries by itself: not a verdict on the version.
_TRANSIENT = frozenset({"download_failed"})


class NodeView:
    """Fed every ``NodeStatus``; answers questions about a fleet's nodes. Never blocks."""

    def __init__(self, *, node_ttl_s: float = 900.0) -> None:
        self.node_ttl_s = node_ttl_s
        self._status: dict[str, dict[str, NodeStatus]] = collections.defaultdict(dict)
        self._rejects: dict[tuple[str, str], NodeStatus] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._status.values())

    def observe(self, status: NodeStatus) -> None:
        nodes = self._status[status.fleet]
        old = nodes.get(status.node)
        if old is None or status.time >= old.time:
            nodes[status.node] = status
        # A rejection is reported once (the node's next periodic status no longer carries
        # it), so it is kept here until the node reports another.
        r = status.refresh
        if r is not None and not r.ok and r.code not in _TRANSIENT:
            self._rejects[(status.fleet, status.node)] = status

    def live(self, fleet: str, now: float) -> dict[str, NodeStatus]:
        """Nodes of ``fleet`` that reported within ``node_ttl_s`` and did not shut down."""
        return {
            n: s
            for n, s in self._status.get(fleet, {}).items()
            if s.event != "shutdown" and s.time.timestamp() >= now - self.node_ttl_s
        }

    def failures(self, state: RolloutState) -> dict[str, str]:
        """Nodes that rejected the version or left it on their own, from their statuses."""
        found = dict(state.failures)
        statuses = self._status.get(state.fleet, {})
        for node, entry in state.nodes.items():
            if node in found:
                continue
            since = entry.assigned_at - _SKEW_S
            rejected = self._rejects.get((state.fleet, node))
            r = rejected.refresh if rejected is not None and rejected.time.timestamp() >= since else None
            if r is not None and r.model.name == state.model and r.model.version == state.version:
                found[node] = f"rejected: {r.code or 'error'} {r.reason}".strip()
                continue
            s = statuses.get(node)
            if s is None or s.time.timestamp() < since:
                continue
            if (
                s.previous_model is not None
                and s.previous_model.version == state.version
                and s.previous_model.name == state.model
                and (s.model is None or s.model.version != state.version)
            ):
                found[node] = "rolled back on the node (local health limits)"
        return found

    def installed(self, state: RolloutState) -> set[str]:
        statuses = self._status.get(state.fleet, {})
        return {
            n
            for n in state.nodes
            if (s := statuses.get(n)) is not None
            and s.model is not None
            and (s.model.name, s.model.version) == (state.model, state.version)
        }
