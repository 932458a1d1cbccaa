"""Helpers for the rollout tests: starting a rollout under a controller, waiting on the state a
``RolloutStore`` holds."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext

from _nats import wait_until
from slmops.cloud.rollout import RolloutConfig, RolloutController, RolloutState, RolloutStore, start_rollout

__all__ = ["start_and_step", "wait_rollout"]


async def start_and_step(
    js: JetStreamContext,
    controller: RolloutController,
    store: RolloutStore,
    *,
    fleet: str,
    model: str,
    config: RolloutConfig,
    now: float,
) -> RolloutState:
    """Start the rollout of ``model`` version 2 on ``fleet`` at ``now`` (through the
    controller's registry), let the controller take its first step a second later, and
    return the state it stored."""
    await start_rollout(
        js, controller.assigner.registry, store, fleet=fleet, version=2, model=model, config=config, now=now
    )
    await controller.step(now + 1)
    got = await store.get(fleet)
    assert got is not None
    return got[0]


async def wait_rollout(
    store: RolloutStore,
    fleet: str,
    pred: Callable[[RolloutState], bool],
    timeout: float = 30,
    interval: float = 0.05,
    what: str = "rollout state",
) -> RolloutState:
    """The fleet's rollout state once ``pred`` holds for it (polled every ``interval`` s);
    ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    found: list[RolloutState] = []

    async def check() -> bool:
        got = await store.get(fleet)
        if got is not None and pred(got[0]):
            found.append(got[0])
            return True
        return False

    await wait_until(check, timeout=timeout, interval=interval, what=what)
    return found[-1]
