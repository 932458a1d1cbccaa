"""Cohorts: which nodes a rollout stage covers, by a stable hash of the node id.

Every node gets a point in [0, 100) from sha256("<fleet>:<node>"), the same in every process
and after every restart. A stage of ``p`` percent covers the ``ceil(p·N/100)`` nodes with the
lowest points (at least one), plus every node an earlier stage already covered — so stages only
ever grow, and the same nodes are canaries again when a fleet retries a rollout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from slmops.shared.names import validate_id

__all__ = ["cohort", "hash_point"]


def hash_point(fleet: str, node: str) -> float:
    """The node's stable point in [0, 100)."""
    digest = hashlib.sha256(f"{validate_id(fleet, 'fleet')}:{validate_id(node, 'node')}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def cohort(fleet: str, nodes: Iterable[str], percent: int, *, already: Iterable[str] = ()) -> set[str]:
    """The nodes a stage of ``percent`` covers among ``nodes`` (see the module docstring)."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 < percent <= 100:
        raise ValueError(f"percent must be an int in 1..100, got {percent!r}")
    ranked = sorted(set(nodes), key=lambda n: (hash_point(fleet, n), n))
    take = max(1, -(-percent * len(ranked) // 100)) if ranked else 0
    return set(ranked[:take]) | set(already)
