"""Fleet configuration in the cloud (issue 17): publishing signed versions to
``slmops_fleetconfig`` (``store``) and staging them over cohorts with gates on "applied and
healthy" (``rollout``). Changes arrive through the change service (``cloud.audit``)."""

from slmops.cloud.fleetconfig.rollout import ConfigRollout, run_config_rollouts, step_rollout
from slmops.cloud.fleetconfig.store import ConfigStore, select_nodes

__all__ = ["ConfigRollout", "ConfigStore", "run_config_rollouts", "select_nodes", "step_rollout"]
