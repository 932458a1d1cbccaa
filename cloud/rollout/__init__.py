"""Staged rollouts: cohorts by stable hash, quality gates, automatic rollback (docs/architecture.md §7).

``start_rollout`` records a rollout in KV ``slmops_rollouts``; a ``RolloutRunner`` (in the cloud
service, or ``slmops rollout run``) drives it with a ``RolloutController``.
"""

from slmops.cloud.config import RolloutConfig  # a config type: lives in cloud.config
from slmops.cloud.rollout.assign import Assigner, start_rollout
from slmops.cloud.rollout.cohort import cohort, hash_point
from slmops.cloud.rollout.controller import RolloutController
from slmops.cloud.rollout.gates import GateResult, Metrics, evaluate, total_variation
from slmops.cloud.rollout.nodes import NodeView
from slmops.cloud.rollout.runner import RolloutRunner
from slmops.cloud.rollout.state import (
    ROLLOUTS_BUCKET,
    RolloutConflict,
    RolloutError,
    RolloutState,
    RolloutStore,
)

__all__ = [
    "ROLLOUTS_BUCKET",
    "Assigner",
    "GateResult",
    "Metrics",
    "NodeView",
    "RolloutConfig",
    "RolloutConflict",
    "RolloutController",
    "RolloutError",
    "RolloutRunner",
    "RolloutState",
    "RolloutStore",
    "cohort",
    "evaluate",
    "hash_point",
    "start_rollout",
    "total_variation",
]
