"""Embedding models on a real node (issue 11): ``POST /v1/embed`` answers L2-normalised
vectors, the wrong endpoint for the model is a clear 400, and the aggregates carry
privacy-safe embedding statistics (projection histograms on the manifest's fixed directions
and the norm histogram) that add up, merge, get noised and suppressed like the others."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from _transformer import make_transformer_bundle

from _edge_util import Keys, edge_config
from slmops.cloud.factory.embedding import embedding_histograms
from slmops.edge.api import serve_api
from slmops.edge.node import EdgeNode
from slmops.edge.privacy import add_noise, suppress
from slmops.edge.window import merge
from slmops.shared.bundle import read_bundle
from slmops.shared.messages import TelemetryAggregate, decode_telemetry
from slmops.shared.runtime import load_session

TEXTS = ["alpha", "some words about beta", "the gamma text", "hello world", "a text " * 30]


async def _post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with s.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def _aggregate(node: EdgeNode) -> TelemetryAggregate:
    # The windower may have closed a window on its own (boundaries are wall-clock minutes).
    await node.windower.tick()
    aggs = [decode_telemetry(payload) for _, payload in await node.buffer.outbox_take(50)]
    assert aggs
    return functools.reduce(merge, aggs)


@pytest.mark.anyio
async def test_embed_answers_normalised_vectors_and_aggregates_embedding_statistics(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    b = make_transformer_bundle(tmp_path / "emb", keys.key, task="embedding", name="emb")
    stats = b.manifest.embedding
    assert stats is not None
    assert len(stats.directions) == 4
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=b.path, http="127.0.0.1:0", window=60.0)
    async with EdgeNode(cfg) as node, serve_api(node) as api, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{api.port}"
        status, body = await _post(s, f"{base}/v1/embed", {"texts": TEXTS})
        assert status == 200, body
        got = np.asarray(body["embeddings"], dtype=np.float32)
        want = load_session(read_bundle(b.path)).run(TEXTS)
        assert np.allclose(got, want.values, atol=1e-6)
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert body["model"] == {"name": "emb", "version": 1, "variant": "fp32"}
        status, body = await _post(s, f"{base}/v1/predict", {"text": "alpha"})
        assert status == 400
        assert body["error"]["field"] == "model"
        assert "use /v1/embed" in body["error"]["message"]
        agg = await _aggregate(node)
    assert (agg.count, agg.errors, agg.class_counts) == (5, 0, {})
    assert want.norms is not None
    projections, norm = embedding_histograms(stats, want.values, want.norms)
    assert agg.embedding is not None
    assert [h.counts for h in agg.embedding.projections] == [h.counts for h in projections]
    assert agg.embedding.norm.counts == norm.counts
    assert all(h.total == 5 for h in agg.embedding.projections)
    assert agg.input_length.total == 5


@pytest.mark.anyio
async def test_embed_on_a_classifier_is_a_clear_400(tmp_path: Path, keys: Keys, fleet: str) -> None:
    b = make_transformer_bundle(tmp_path / "clf", keys.key)
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=b.path, http="127.0.0.1:0", window=60.0)
    async with EdgeNode(cfg) as node, serve_api(node) as api, aiohttp.ClientSession() as s:
        status, body = await _post(s, f"http://127.0.0.1:{api.port}/v1/embed", {"text": "alpha"})
        assert status == 400
        assert (
            body["error"]["message"] == "the model is a classification model: use /v1/predict, not /v1/embed"
        )
        assert node.batcher.served == 0


@pytest.mark.anyio
async def test_a_non_finite_embedding_is_an_error(tmp_path: Path, keys: Keys, fleet: str) -> None:
    b = make_transformer_bundle(tmp_path / "nan", keys.key, task="embedding", nan_word="nanword")
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=b.path, http="127.0.0.1:0", window=60.0)
    async with EdgeNode(cfg) as node, serve_api(node) as api, aiohttp.ClientSession() as s:
        status, body = await _post(
            s, f"http://127.0.0.1:{api.port}/v1/embed", {"texts": ["alpha", "nanword"]}
        )
        assert status == 500
        assert body["error"]["code"] == "non_finite_output"
        agg = await _aggregate(node)
    assert (agg.count, agg.errors) == (2, 2)
    assert agg.embedding is not None
    assert all(h.total == 0 for h in agg.embedding.projections)


@pytest.mark.anyio
async def test_embedding_statistics_merge_and_are_noised_and_suppressed(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    b = make_transformer_bundle(tmp_path / "emb", keys.key, task="embedding")
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=b.path, window=60.0)
    async with EdgeNode(cfg) as node:
        await node.embed(TEXTS[:3])
        await node.windower.tick()
        await node.embed(TEXTS[3:])
        await node.windower.tick()
        aggs = [decode_telemetry(p) for _, p in await node.buffer.outbox_take(50)]
    first, second = aggs[0], functools.reduce(merge, aggs[1:])
    assert first.count + second.count == 5
    both = merge(first, second)
    assert both.embedding is not None
    assert [h.total for h in both.embedding.projections] == [first.count + second.count] * 4
    noised = add_noise(both, 1.0, np.random.default_rng(0), [])
    assert noised.privacy.mechanism == "geometric"
    assert noised.embedding is not None
    assert [h.counts for h in noised.embedding.projections] != [h.counts for h in both.embedding.projections]
    hidden = suppress(both)
    assert hidden.embedding is not None
    assert all(h.total == 0 for h in hidden.embedding.projections)
    assert hidden.embedding.norm.total == 0
