"""Horizontal cloud (issue 18): instances limited to fleets (``--fleet``) split the fleets
between them — each holds its own lease and consumer and touches only its fleet's nodes — and
a standby for one fleet takes over its lease from the shared state while the other fleet's
instance carries on; every aggregate counted exactly once. Default service settings."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest
from _cloud_util import make_aggregate, make_manifest, publish, put_manifest
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from _nats import wait_until
from slmops.cloud.config import CloudConfig
from slmops.cloud.ingest.overview import lease_holders
from slmops.cloud.service import CloudService
from slmops.shared.messages import TelemetryAggregate
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio


async def _serve(svc: CloudService, stop: anyio.Event, *, task_status: TaskStatus[None]) -> None:
    async with svc:
        task_status.started()
        await stop.wait()


def _count(svc: CloudService, fleet: str) -> tuple[int, int]:
    mine = [n for (f, _), n in svc.nodes.items() if f == fleet]
    return sum(n.aggregates for n in mine), sum(n.inferences for n in mine)


async def test_two_instances_split_fleets_and_a_standby_takes_over_one_fleets_lease(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(18)
    await put_manifest(js, make_manifest())
    f1, f2 = f"{fleet}x", f"{fleet}y"

    def aggs(f: str, seqs: range) -> list[TelemetryAggregate]:
        return [make_aggregate(f, f"{f}-n{i}", s, 150, rng) for s in seqs for i in range(3)]

    def service(f: str, holder: str) -> CloudService:
        state = tmp_path / f  # the standby of f1 shares a's state directory
        return CloudService(
            CloudConfig(nats_url=nats_server.url, state_dir=str(state), fleets=[f]), holder=holder
        )

    a, b, standby = service(f1, "a"), service(f2, "b"), service(f1, "s")
    first = {f1: aggs(f1, range(1, 11)), f2: aggs(f2, range(1, 11))}
    later = {f1: aggs(f1, range(11, 21)), f2: aggs(f2, range(11, 21))}
    stops = {x.holder: anyio.Event() for x in (a, b, standby)}
    async with anyio.create_task_group() as tg:
        await tg.start(_serve, a, stops["a"])
        await tg.start(_serve, b, stops["b"])
        await a.wait_active(30)
        await b.wait_active(30)
        await tg.start(_serve, standby, stops["s"])  # after a holds cloud-<f1>: it stands by
        for agg in first[f1] + first[f2]:
            await publish(js, agg)
        await wait_until(lambda: _count(a, f1)[0] == 30 and _count(b, f2)[0] == 30, 60, what="both fleets")
        assert {f for f, _ in a.nodes} == {f1}
        assert {f for f, _ in b.nodes} == {f2}
        assert not standby.active
        assert standby.statistics().messages == 0
        holders = await lease_holders(js)
        assert holders[a.lease_key] == "a"
        assert holders[b.lease_key] == "b"
        assert a.lease_key != b.lease_key

        stops["a"].set()  # f1's active instance stops; f2's carries on
        await standby.wait_active(60)
        for agg in later[f1] + later[f2]:
            await publish(js, agg)
        await wait_until(lambda: _count(standby, f1)[0] == 60 and _count(b, f2)[0] == 60, 60, what="rest")
        want = {f: sum(x.count for x in first[f] + later[f]) for f in (f1, f2)}
        assert _count(standby, f1) == (60, want[f1])  # from the shared state: nothing twice
        assert _count(b, f2) == (60, want[f2])
        assert b.takeovers == 1  # never interrupted
        assert (await lease_holders(js))[standby.lease_key] == "s"
        stops["b"].set()
        stops["s"].set()
