"""The cloud starts on a state directory written by the previous release and carries on
(issue 13, precise terms: upgrades). ``fixtures/cloud_state_06cfd20.sqlite3`` was written by
``slmops cloud`` at commit 06cfd20 with ``fixtures/make_cloud_state_06cfd20.py.txt`` (run with a
``git archive 06cfd20`` tree on PYTHONPATH; kept as text because it imports the old top-level
package names): fleet ``legacy``, nodes ``a`` and ``b``, seqs 1-10 each (150 inferences per
window), one drift group."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import pytest
from _cloud_util import make_aggregate, make_manifest, publish, put_manifest
from nats.js import JetStreamContext
from test_cloud_poison import default_config

from _nats import wait_until
from slmops.cloud.ingest.dedupe import SeqTracker
from slmops.cloud.ingest.state import InstallEpoch, NodeState
from slmops.cloud.service import CloudService
from slmops.shared.messages import encode_telemetry
from slmops.shared.names import telemetry_subject
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

OLD_STATE = Path(__file__).parent / "fixtures" / "cloud_state_06cfd20.sqlite3"


async def test_new_cloud_carries_on_from_the_previous_release_state(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """Counts, seq trackers and the drift group of the old file are used as they are: node
    ``a``'s seqs 8-10 sent again are duplicates, 11-15 are new; a new install of ``a`` (an
    upgraded edge) is a new epoch after the legacy one; node ``b`` keeps its 10."""
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(OLD_STATE, state / "cloud.sqlite3")
    await put_manifest(js, make_manifest())
    rng = np.random.default_rng(7)
    config = default_config(nats_server.url, state, ["legacy"])
    async with CloudService(config) as svc:
        await svc.wait_active(30)
        before = svc.nodes
        assert before[("legacy", "a")].aggregates == 10
        assert before[("legacy", "b")].inferences == 1500
        assert svc.detector is not None
        assert "legacy/kw/1/fp32" in svc.detector.groups
        for seq in range(8, 16):
            await publish(js, make_aggregate("legacy", "a", seq, 150, rng))
        install = "ab" * 16
        for seq in range(1, 4):
            agg = make_aggregate("legacy", "a", seq, 150, rng)
            agg.install = install
            await js.publish(
                telemetry_subject("legacy", "a"),
                encode_telemetry(agg),
                headers={"Nats-Msg-Id": f"legacy/a/{install}:{seq}"},
            )
        await wait_until(lambda: svc.nodes[("legacy", "a")].aggregates == 18, 30, what="applied")
        await wait_until(lambda: svc.nodes[("legacy", "a")].duplicates == 3, 10, what="duplicates")
        a, b = svc.nodes[("legacy", "a")], svc.nodes[("legacy", "b")]
        counters = svc.statistics().counters
    assert a.inferences == 18 * 150
    assert a.epochs[""].seqs.high == 15
    assert a.epochs[""].seqs.missing == 0
    assert a.epochs[install].seqs.high == 3
    assert a.install == install
    assert b.aggregates == 10
    assert counters["aggregates"] == 20 + 8


async def test_node_state_whose_epochs_carry_node_fields_still_decodes() -> None:
    """State written while ``InstallEpoch`` repeated six ``NodeState`` fields (``epochs``,
    ``install``, ``conflicts``, ``clones``, ``status_stored``, ``clock_skew``, all unused on an
    epoch) decodes with the epoch's own fields intact."""
    stored = datetime(2026, 11, 30, 12, tzinfo=UTC)
    epoch = msgspec.to_builtins(
        InstallEpoch(seqs=SeqTracker(contiguous=7), first_stored=stored, aggregates=7, recent={7: "ab"})
    )
    epoch.update(epochs={}, install="x", conflicts=["a/b"], clones=2, status_stored=None, clock_skew=1.5)
    blob = msgspec.msgpack.encode(
        {"fleet": "f", "node": "n", "install": "i" * 32, "epochs": {"i" * 32: epoch}}
    )
    node = msgspec.msgpack.decode(blob, type=NodeState)
    got = node.epochs["i" * 32]
    assert (got.seqs.high, got.first_stored, got.aggregates, got.recent) == (7, stored, 7, {7: "ab"})
    assert (node.install, node.conflicts, node.clones) == ("i" * 32, [], 0)
