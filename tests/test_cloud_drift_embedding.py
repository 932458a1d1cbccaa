"""Embedding drift end to end (issue 11): an embedding model imported with its held-out
reference, real edge nodes serving it (their aggregates carry the projection and norm
histograms, privacy-filtered as any other), those aggregates published to JetStream as the
edge sends them, and the cloud service's drift detector: steady traffic opens no embedding
drift; traffic of other texts opens an ``embedding_projection`` event for the fleet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _cloud_util import cloud_config, drift_events, put_manifest
from _transformer import encoder_onnx, tokenizer_json
from nats.js import JetStreamContext

from _edge_util import Keys, edge_config
from _nats import wait_until
from slmops.cloud.drift.signals import extract, manifest_refs
from slmops.cloud.factory.importer import import_model
from slmops.cloud.service import CloudService
from slmops.edge.node import EdgeNode
from slmops.shared.messages import decode_telemetry
from slmops.shared.names import msg_id, telemetry_subject
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

USUAL = ["alpha", "beta", "some", "words", "about", "the", "a", "text"]
OTHER = ["gamma", "hello", "world", "long"]
NODES = ("n1", "n2")
STEADY, SHIFTED = 10, 6  #: rounds (one window per node each)
PER_WINDOW = 200


def _texts(rng: np.random.Generator, words: list[str], n: int) -> list[str]:
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(n)]


async def test_a_shift_in_what_is_embedded_opens_an_embedding_drift_event(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path, keys: Keys
) -> None:
    rng = np.random.default_rng(11)
    (tmp_path / "enc.onnx").write_bytes(encoder_onnx())
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json())
    (tmp_path / "heldout.jsonl").write_text(
        "\n".join(f'{{"text": "{t}"}}' for t in _texts(rng, USUAL, 2000)) + "\n"
    )
    bundle = import_model(
        onnx_path=tmp_path / "enc.onnx",
        tokenizer_path=tmp_path / "tokenizer.json",
        data_path=tmp_path / "heldout.jsonl",
        name=f"e{fleet}",
        version=1,
        key=keys.key,
        out_dir=tmp_path / "bundle",
        task="embedding",
    ).bundle
    manifest = bundle.manifest
    refs = manifest_refs(manifest)
    assert {"embedding_projection", "embedding_norm"} <= set(refs)
    await put_manifest(js, manifest)

    # Real nodes make the aggregates (offline: their outboxes are published below).
    payloads: list[tuple[str, int, bytes]] = []
    # One window per round, closed by the test (``tick``), not by the clock.
    configs = [
        edge_config(tmp_path, keys, fleet=fleet, node=n, model=bundle.path, window=3600.0) for n in NODES
    ]
    async with EdgeNode(configs[0]) as a, EdgeNode(configs[1]) as b:
        for round_ in range(STEADY + SHIFTED):
            words = USUAL if round_ < STEADY else OTHER
            for node in (a, b):
                await node.embed(_texts(rng, words, PER_WINDOW))
                await node.windower.tick()
        for node in (a, b):  # the outbox keeps what it hands out until acked: take once
            payloads += [(node.config.node, s, p) for s, p in await node.buffer.outbox_take(1000)]
    aggs = [decode_telemetry(p) for _, _, p in payloads]
    assert sum(a.count for a in aggs) == (STEADY + SHIFTED) * len(NODES) * PER_WINDOW
    first = aggs[0]
    assert first.embedding is not None
    signals = extract(first, [], {})
    assert sum(signals["embedding_projection"][0]) == pytest.approx(first.count)  # each text once
    assert sum(signals["embedding_norm"][0]) == first.count

    async with CloudService(cloud_config(nats_server.url, tmp_path / "cloud", fleet)) as svc:
        await svc.wait_active(20)
        # In window-time order, as live nodes send them: rounds are keyed by window time, so
        # one node's whole outbox ahead of the other's would make the other's windows late
        # (node evidence only, ``DriftDetector``).
        for _, (node, seq, payload) in sorted(
            zip(aggs, payloads, strict=True), key=lambda x: x[0].window_end
        ):
            await js.publish(
                telemetry_subject(fleet, node), payload, headers={"Nats-Msg-Id": msg_id(node, seq, fleet)}
            )

        def applied() -> int:
            return sum(n.aggregates for (f, _), n in svc.nodes.items() if f == fleet)

        await wait_until(lambda: applied() == len(payloads), 30, what="all aggregates applied")
        await wait_until(lambda: svc.statistics().events_pending == 0, 10, what="events out")
    events = await drift_events(js, fleet)
    embedding = [e for e in events if e.signal.startswith("embedding_") and e.kind == "drift"]
    opened = [e for e in embedding if e.state == "opened"]
    assert opened, [(e.kind, e.signal, e.state, e.scope) for e in events]
    assert "embedding_projection" in {e.signal for e in opened}
    # Nothing opened during the steady part: every opened window starts in the shifted one.
    shift_start = next(a.window_start for a, (_, _, p) in zip(aggs, payloads, strict=True) if a.seq > STEADY)
    assert all(e.window_end >= shift_start for e in opened), [(e.signal, e.window_start) for e in opened]
