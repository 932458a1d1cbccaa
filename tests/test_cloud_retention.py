"""Issue 13 fault 12: every stream has documented limits and a discard policy, and a flood of
poison cannot fill JetStream through dead letters (rate-limited per sender)."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js import JetStreamContext
from nats.js import api as js_api
from test_cloud_poison import deadletters, default_config

from _nats import new_fleet, wait_until
from slmops.cloud.service import CloudService
from slmops.shared.names import DEADLETTER_STREAM, telemetry_subject
from slmops.shared.provision import STREAMS, ensure_resources
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

SUPPRESSED = "deadletter_suppressed"


async def test_every_stream_has_an_age_a_size_and_a_discard_policy(
    private_server: EmbeddedServer,
) -> None:
    """A stream an older release created without limits gets them at the next start; a new
    one is created with them. Before, no stream had a max size and the dead-letter and
    rollout streams had no max age."""
    import nats

    nc = await nats.connect(private_server.url)
    try:
        js = nc.jetstream()
        # As the previous release created the dead-letter stream: no limits at all.
        await js.add_stream(
            js_api.StreamConfig(
                name=DEADLETTER_STREAM,
                subjects=["slmops.deadletter", "slmops.deadletter.>"],
                storage=js_api.StorageType.FILE,
            )
        )
        await ensure_resources(js)
        for spec in STREAMS:
            cfg = (await js.stream_info(spec.name)).config
            assert (cfg.max_age or 0) > 0, spec.name
            assert (cfg.max_bytes or 0) > 0, spec.name
            assert (cfg.max_msg_size or 0) > 0, spec.name
            want = js_api.DiscardPolicy.NEW if spec.discard == "new" else js_api.DiscardPolicy.OLD
            assert cfg.discard == want, spec.name
            assert (cfg.max_consumers or 0) > 0, spec.name  # set on an existing stream too
        tele = (await js.stream_info("SLMOPS_TELEMETRY")).config
        assert tele.discard_new_per_subject
        assert tele.max_msgs_per_subject == 100_000
    finally:
        await nc.close()


async def test_a_poison_flood_from_one_node_is_rate_limited_in_the_dead_letter_stream(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """200 undecodable messages from one node: the first ``burst`` are copied to the
    dead-letter stream with their reason, the rest terminated without a copy and counted; a
    second node's poison is still copied (the limit is per sender); the service keeps going."""
    fleet = new_fleet()
    async with CloudService(default_config(nats_server.url, tmp_path, [fleet])) as svc:
        await svc.wait_active(30)
        for i in range(200):
            await js.publish(telemetry_subject(fleet, "flood"), b"\xc1 not msgpack %d" % i)
        for i in range(3):
            await js.publish(telemetry_subject(fleet, "other"), b"\xc1 junk %d" % i)
        await wait_until(
            lambda: sum(svc.statistics().counters.get(k, 0) for k in ("deadlettered", SUPPRESSED)) >= 203,
            60,
            what="every poison settled",
        )
        counters = svc.statistics().counters
        assert svc.active
    letters = await deadletters(js, fleet)
    flood = [k for k in letters if ".flood#" in k]
    other = [k for k in letters if ".other#" in k]
    assert 20 <= len(flood) <= 30  # the burst, plus what the refill rate allowed meanwhile
    assert len(other) == 3
    assert counters["deadletter_suppressed"] == 200 - len(flood)
    assert counters["deadlettered"] == len(flood) + 3
