"""Helpers for the rollout tests: starting a rollout under a controller, waiting on the state a
``RolloutStore`` holds."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _edge_util import Keys, edge_config
from _models import make_bundle
from _nats import wait_until
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import (
    RolloutConfig,
    RolloutController,
    RolloutRunner,
    RolloutState,
    RolloutStore,
    start_rollout,
)
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import TrustStore

__all__ = ["edge_nodes", "roll_out_v2", "start_and_step", "two_versions", "wait_rollout"]


async def two_versions(js: JetStreamContext, tmp_path: Path, fleet: str, model: str) -> Registry:
    """A registry holding ``model`` versions 1 and 2 (signed test bundles, under ``tmp_path``)
    with ``fleet`` assigned version 1 fleet-wide."""
    key = Ed25519PrivateKey.generate()
    registry = Registry(js)
    for version in (1, 2):
        bundle = make_bundle(tmp_path / f"v{version}", key, version=version, name=model)
        await registry.push(bundle, TrustStore([key.public_key()]))
    await registry.assign(fleet, 1, model=model)
    return registry


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


async def edge_nodes(
    stack: AsyncExitStack,
    tmp_path: Path,
    keys: Keys,
    *,
    fleet: str,
    url: str,
    model: Path,
    n: int,
    prefix: str = "e",
) -> list[EdgeNode]:
    """``n`` running EdgeNodes ``<fleet>-<prefix><i>`` on ``model`` (status every 0.5 s), closed
    with ``stack``."""
    configs = [
        edge_config(
            tmp_path,
            keys,
            fleet=fleet,
            node=f"{fleet}-{prefix}{i}",
            url=url,
            model=str(model),
            status_interval=0.5,
        )
        for i in range(n)
    ]
    return [await stack.enter_async_context(EdgeNode(cfg)) for cfg in configs]


async def roll_out_v2(
    js: JetStreamContext,
    runner: RolloutRunner,
    nodes: list[EdgeNode],
    *,
    fleet: str,
    model: str,
    config: RolloutConfig,
    timeout: float,
) -> RolloutState:
    """Once the runner sees every node, start the rollout of ``model`` version 2 and wait
    until it completed and every node serves version 2; returns the final state."""
    store = RolloutStore(js)
    await wait_until(
        lambda: len(runner.controller.live_nodes(fleet, 0)) == len(nodes), timeout=30, what="statuses"
    )
    registry = runner.controller.assigner.registry
    await start_rollout(js, registry, store, fleet=fleet, version=2, model=model, config=config)
    state = await wait_rollout(
        store, fleet, lambda s: s.phase == "done", timeout, 0.1, what="rollout finished"
    )
    assert state.status == "completed", (state.reason, state.gates)
    await wait_until(
        lambda: all(n.models.current is not None and n.models.current.ref.version == 2 for n in nodes),
        timeout=30,
        what="every node serving v2",
    )
    return state
