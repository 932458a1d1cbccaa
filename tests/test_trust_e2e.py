"""End to end in operator mode (issue 17): an enrolled edge node with nothing but its creds
follows its assignment, downloads and installs the bundle, serves, and its aggregates are
counted by the cloud running with the cloud's creds; neither needs a right it was not given
(no permission error in their logs). Default timeouts; only pace shrinks (window, k)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import structlog.testing
from _cloud_util import cloud_config

from _edge_util import Keys, edge_config
from _models import make_bundle
from _nats import operator_server, wait_until
from slmops.cloud.registry import Registry
from slmops.cloud.service import CloudService
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import TrustStore
from slmops.shared.connect import connect_once
from slmops.shared.connopts import ConnectOptions
from slmops.shared.messages import ModelRef

pytestmark = pytest.mark.anyio

FLEET, NODE = "shop", "till-7"


async def test_enrolled_edge_node_gets_its_model_and_the_cloud_counts_its_aggregates(
    tmp_path: Path, keys: Keys
) -> None:
    async with operator_server(tmp_path / "fleet") as (server, fleet_dir):
        creds = fleet_dir.enroll("node", fleet=FLEET, node=NODE).creds
        cloud_options = ConnectOptions(nats_creds=fleet_dir.cloud_creds)
        nc = await connect_once(server.url, options=cloud_options)
        try:
            js = nc.jetstream()
            bundle = make_bundle(tmp_path / "v1", keys.key, version=1, name="kw")
            await Registry(js).push(bundle, TrustStore([keys.key.public_key()]))
            await Registry(js).assign(FLEET, 1, model="kw")
        finally:
            await nc.close()

        node_cfg = edge_config(tmp_path, keys, fleet=FLEET, node=NODE, url=server.url, nats_creds=str(creds))
        cloud_cfg = msgspec.structs.replace(
            cloud_config(server.url, tmp_path / "cloud", FLEET), nats_creds=str(fleet_dir.cloud_creds)
        )
        with structlog.testing.capture_logs() as logs:
            async with CloudService(cloud_cfg) as svc, EdgeNode(node_cfg) as node:
                await svc.wait_active(20)
                want = ModelRef(name="kw", version=1)
                msg = "the assigned model installed with creds"
                await wait_until(lambda: getattr(node.models.current, "ref", None) == want, 30, what=msg)
                answered = 0
                for _ in range(5):
                    answered += len(await node.predict(["alpha", "beta gamma"]))

                def counted() -> int:
                    return sum(n.inferences for (f, _), n in svc.nodes.items() if f == FLEET)

                await wait_until(lambda: counted() == answered, 30, what="every answer counted by the cloud")
        refused = [e for e in logs if "permission" in str(e).lower() or "authorization" in str(e).lower()]
        assert refused == [], refused
