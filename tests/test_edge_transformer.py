"""A transformer bundle (tokenizer + encoder + head) served by a real node: inputs and output
bound from the manifest, length-grouped micro-batches, input length in tokens; and a model
that gives NaN for some inputs answers an error for those texts and counts them as errors
(issue 13, fault 7)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
import pytest
from _transformer import make_transformer_bundle

from _edge_util import Keys, edge_config
from slmops.edge.api import ApiServer, serve_api
from slmops.edge.inference import InferenceFailed
from slmops.edge.node import EdgeNode
from slmops.edge.window import merge
from slmops.shared.bundle import TrustStore, read_bundle
from slmops.shared.messages import TelemetryAggregate, decode_telemetry
from slmops.shared.runtime import _length_groups, load_session, verify_bundle


async def _aggregate(node: EdgeNode) -> TelemetryAggregate:
    # The windower may have closed a window on its own (boundaries are wall-clock minutes).
    await node.windower.tick()
    aggs = [decode_telemetry(payload) for _, payload in await node.buffer.outbox_take(50)]
    assert aggs
    return functools.reduce(merge, aggs)


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def served(tmp_path: Path, keys: Keys, fleet: str) -> AsyncIterator[tuple[EdgeNode, ApiServer]]:
    bundle = make_transformer_bundle(tmp_path / "tf", keys.key)
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=bundle.path, http="127.0.0.1:0", window=60.0)
    async with EdgeNode(cfg) as n, serve_api(n) as api:
        yield n, api


@pytest.mark.anyio
async def test_a_transformer_bundle_serves_over_http(served: tuple[EdgeNode, ApiServer]) -> None:
    node, api = served
    texts = ["some words about alpha", "the beta", "gamma " + "text " * 100, "hello"]
    async with aiohttp.ClientSession() as s:
        status, body = await _post(s, f"http://127.0.0.1:{api.port}/v1/predict", {"texts": texts})
    assert status == 200, body
    assert [p["label"] for p in body["predictions"][:3]] == ["alpha", "beta", "gamma"]
    assert body["model"]["name"] == "tfclf"
    agg = await _aggregate(node)
    assert agg.count == 4
    assert agg.errors == 0
    # Lengths in tokens ([CLS] ... [SEP]), truncated at max_tokens 32: 6, 4, 32, 3 tokens.
    edges = agg.input_length.edges
    expected = np.histogram([6, 4, 32, 3], bins=edges)[0].tolist()
    assert agg.input_length.counts == expected


def test_outputs_are_bound_from_the_manifest_and_match_one_text_at_a_time(tmp_path: Path, keys: Keys) -> None:
    """Grouping by length and padding to the group's longest changes no answer: each text's
    probabilities equal those of the text run alone (no padding at all)."""
    b = make_transformer_bundle(tmp_path / "tf", keys.key)
    s = load_session(read_bundle(b.path))
    texts = ["alpha", "beta " * 25, "the gamma text", "", "日本語 😀", "a " * 200 + "beta"]
    together = s.run(texts).values
    alone = np.stack([s.run([t]).values[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(together.sum(axis=1), 1.0, atol=1e-5)  # logits -> softmax


def test_length_groups_keep_short_texts_apart_from_long_ones() -> None:
    lengths = [3, 64, 4, 60, 5, 3]
    groups = _length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert {tuple(sorted(g)) for g in groups} == {(0, 2, 4, 5), (1, 3)}


def test_a_single_file_logits_model_and_the_two_file_one_agree(tmp_path: Path, keys: Keys) -> None:
    two = load_session(make_transformer_bundle(tmp_path / "two", keys.key))
    one = load_session(make_transformer_bundle(tmp_path / "one", keys.key, single_file=True))
    texts = ["alpha beta", "gamma", "hello world"]
    assert np.allclose(two.run(texts).values, one.run(texts).values, atol=1e-6)


@pytest.mark.anyio
async def test_non_finite_outputs_are_errors_not_answers(tmp_path: Path, keys: Keys, fleet: str) -> None:
    """Fault 7: a signed model giving NaN for texts with one word passes its smoke tests and the
    hostile inputs; served, those texts get an HTTP error, other requests of the same micro-batch
    are answered, and the aggregate counts the failed request's texts as errors."""
    bundle = make_transformer_bundle(tmp_path / "nan", keys.key, nan_word="nanword")
    verify_bundle(read_bundle(bundle.path), TrustStore([keys.key.public_key()]))  # it is accepted
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, model=bundle.path, http="127.0.0.1:0", window=60.0, max_batch_wait=0.05
    )
    async with EdgeNode(cfg) as node, serve_api(node) as api, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{api.port}/v1/predict"
        results: dict[str, tuple[int, Any]] = {}

        async def one(name: str, body: Any) -> None:
            results[name] = await _post(s, url, body)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "bad", {"texts": ["alpha", "a nanword here"]})
            tg.start_soon(one, "good", {"texts": ["beta", "gamma"]})
            tg.start_soon(one, "alone", {"text": "nanword"})
        assert results["good"][0] == 200
        assert [p["label"] for p in results["good"][1]["predictions"]] == ["beta", "gamma"]
        for name, index in (("bad", "[1]"), ("alone", "[0]")):
            status, body = results[name]
            assert status == 500
            assert body["error"]["code"] == "non_finite_output"
            assert index in body["error"]["message"]
        agg = await _aggregate(node)
        assert agg.count == 5
        assert agg.errors == 3  # the failed requests' texts: none of them was answered
        assert sum(agg.class_counts.values()) == 2
        assert node.batcher.failed == 3
        with pytest.raises(InferenceFailed):
            await node.predict(["nanword"])
