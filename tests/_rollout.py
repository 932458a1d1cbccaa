"""Helpers for the rollout tests: waiting on the state a ``RolloutStore`` holds."""

from __future__ import annotations

from collections.abc import Callable

from _nats import wait_until
from slmops.cloud.rollout import RolloutState, RolloutStore

__all__ = ["wait_rollout"]


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
