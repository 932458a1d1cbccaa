"""Several models on one node (issue 11, "More than one model per node"): the MiniLM
classifier (int8-l3 of the suite's cached build) and an embedder served side by side, each
request routed by model name (default: the node's first model of the endpoint's task), each
model with its own telemetry aggregates, its own cache slot (a new version of one leaves the
other alone) and its own rollback; both come back from the cache after a restart."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
import pytest
from _transformer import make_transformer_bundle

from _edge_util import Keys, edge_config
from _nats import wait_until
from slmops.cloud.factory.cache import CachedModel
from slmops.edge.api import serve_api
from slmops.edge.errors import InvalidInput
from slmops.edge.node import EdgeNode
from slmops.edge.window import merge
from slmops.shared.bundle import read_bundle
from slmops.shared.messages import TelemetryAggregate, decode_telemetry
from slmops.shared.runtime import load_session

TEXTS = ["what is the weather like", "tell me a joke about computers", "hello", "who wrote hamlet"]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def _config(tmp_path: Path, keys: Keys, minilm: CachedModel, fleet: str, emb: Path, **kw: Any) -> Any:
    return edge_config(
        tmp_path,
        keys,
        fleet=fleet,
        model=minilm.bundles["int8-l3"],
        models=[str(emb)],
        trust=[keys.pub, minilm.pub_path],
        window=60.0,
        **kw,
    )


async def _aggregates(node: EdgeNode) -> dict[str, TelemetryAggregate]:
    await node.windower.tick()
    by_model: dict[str, list[TelemetryAggregate]] = {}
    for _, payload in await node.buffer.outbox_take(50):
        agg = decode_telemetry(payload)
        by_model.setdefault(agg.model.name, []).append(agg)
    return {name: functools.reduce(merge, aggs) for name, aggs in by_model.items()}


async def _post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with s.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.anyio
async def test_a_classifier_and_an_embedder_are_served_side_by_side(
    tmp_path: Path, keys: Keys, fleet: str, minilm_default: CachedModel
) -> None:
    emb = make_transformer_bundle(tmp_path / "emb", keys.key, task="embedding", name="emb")
    clf_bundle = read_bundle(minilm_default.bundles["int8-l3"])
    clf_name = clf_bundle.manifest.name
    want_labels = [p.label for p in load_session(clf_bundle).predict(TEXTS)]
    want_vectors = load_session(read_bundle(emb.path)).run(TEXTS).values
    cfg = _config(tmp_path, keys, minilm_default, fleet, emb.path, http="127.0.0.1:0")
    async with EdgeNode(cfg) as node, serve_api(node) as api, aiohttp.ClientSession() as s:
        assert node.models.names == [clf_name, "emb"]
        assert node.models.current is not None
        assert node.models.current.ref.name == clf_name  # the first is the default

        # Python API: by default each endpoint goes to its task's first model; by name too.
        assert [p.label for p in await node.predict(TEXTS)] == want_labels
        assert [p.label for p in await node.predict(TEXTS, clf_name)] == want_labels
        got = await node.embed(TEXTS)
        assert got.model.name == "emb"
        assert np.allclose(np.asarray(got.embeddings, dtype=np.float32), want_vectors, atol=1e-6)
        with pytest.raises(InvalidInput, match="'emb' is a embedding model: use /v1/embed"):
            await node.predict(TEXTS, "emb")
        with pytest.raises(InvalidInput, match=r"'nope' is not served here \(models: \["):
            await node.embed(TEXTS, "nope")

        # HTTP: "model" in the body routes; a wrong one is a 400 naming the field.
        base = f"http://127.0.0.1:{api.port}"
        status, body = await _post(s, f"{base}/v1/predict", {"texts": TEXTS, "model": clf_name})
        assert status == 200, body
        assert [p["label"] for p in body["predictions"]] == want_labels
        assert body["model"]["name"] == clf_name
        status, body = await _post(s, f"{base}/v1/embed", {"text": TEXTS[0], "model": "emb"})
        assert status == 200, body
        assert np.allclose(body["embeddings"][0], want_vectors[0], atol=1e-6)
        for bad, field in (({"text": "x", "model": "nope"}, "model"), ({"text": "x", "model": 3}, "model")):
            status, body = await _post(s, f"{base}/v1/predict", bad)
            assert (status, body["error"]["field"]) == (400, field), body
        async with s.get(f"{base}/v1/health") as resp:
            health = await resp.json()
        assert [m["name"] for m in health["models"]] == [clf_name, "emb"]
        assert health["model"]["name"] == clf_name
        assert [m.name for m in node._snapshot("periodic").models] == [clf_name, "emb"]

        # Concurrent callers of both models: micro-batches hold one model each, every
        # answer comes from the model asked for.
        answers: dict[int, Any] = {}

        async def call(i: int) -> None:
            text = TEXTS[i % len(TEXTS)]
            answers[i] = await (node.embed([text]) if i % 2 else node.predict([text]))

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(call, i)
        for i, answer in answers.items():
            k = i % len(TEXTS)
            if i % 2:
                assert answer.model.name == "emb"
                assert np.allclose(answer.embeddings[0], want_vectors[k], atol=1e-6)
            else:
                assert (answer[0].model.name, answer[0].label) == (clf_name, want_labels[k])

        # Telemetry: one aggregate per model, each counting only its own inferences.
        aggs = await _aggregates(node)
    assert set(aggs) == {clf_name, "emb"}
    assert aggs[clf_name].count == 4 + 4 + 4 + 20  # predict x2, HTTP predict, concurrent
    assert aggs["emb"].count == 4 + 1 + 20
    assert aggs["emb"].embedding is not None
    assert aggs[clf_name].embedding is None
    assert sum(aggs[clf_name].class_counts.values()) == aggs[clf_name].count
    assert aggs["emb"].class_counts == {}

    # A restart brings both back from the cache, in the same order, without --model flags.
    cfg2 = edge_config(tmp_path, keys, fleet=fleet, trust=[keys.pub, minilm_default.pub_path])
    async with EdgeNode(cfg2) as node:
        assert node.models.names == [clf_name, "emb"]
        assert [p.label for p in await node.predict(TEXTS)] == want_labels
        assert (await node.embed(TEXTS[:1])).model.name == "emb"


@pytest.mark.anyio
async def test_a_new_version_of_one_model_leaves_the_other_alone(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """Each model has its own slot: installing and rolling back the embedder's v2 neither
    swaps nor forgets the classifier, and each keeps its own previous version."""
    clf1 = make_transformer_bundle(tmp_path / "clf1", keys.key, name="clf")
    clf2 = make_transformer_bundle(tmp_path / "clf2", keys.key, name="clf", version=2, bias=[0.0, 0.1, 0.0])
    emb1 = make_transformer_bundle(tmp_path / "emb1", keys.key, task="embedding", name="emb")
    emb5 = make_transformer_bundle(tmp_path / "emb5", keys.key, task="embedding", name="emb", version=5)
    events: list[tuple[str, str, int]] = []
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=clf1.path, models=[str(emb1.path)])
    async with EdgeNode(cfg) as node:
        node.models.on_change(lambda e, a: events.append((e, a.ref.name, a.ref.version)))
        await node.models.install(clf2.path, source="test")
        assert node.safety.statistics().watching  # the default's new version is watched
        await node.models.install(emb5.path, source="test")
        assert [(m.ref.name, m.ref.version) for m in node.models.all()] == [("clf", 2), ("emb", 5)]
        assert (await node.embed(["alpha"])).model.version == 5
        assert (await node.predict(["alpha"]))[0].model.version == 2
        # The node's safety monitor watches the default model only: the embedder's new
        # version is not taken for the default's (to judge and maybe roll back).
        assert (node.safety.statistics().watching, node.safety.statistics().version) == (True, 2)
        assert node.models.previous == clf1.manifest.ref
        back = await node.models.rollback("emb")
        assert back == emb1.manifest.ref
        assert [(m.ref.name, m.ref.version) for m in node.models.all()] == [("clf", 2), ("emb", 1)]
        assert node.models.previous_of("emb") == emb5.manifest.ref
        assert (await node.predict(["alpha"]))[0].model.version == 2
        assert node.buffer.live_model_ids == {m.model_id for m in node.models.all()}
    assert events == [("model_installed", "clf", 2), ("model_installed", "emb", 5), ("rollback", "emb", 1)]
    # The cache keeps each model's current and previous bundle, nothing else.
    dirs = sorted(p.name for p in (cfg.data_path / "models").iterdir() if p.is_dir() and p.name[0] != ".")
    assert dirs == ["clf__1__fp32", "clf__2__fp32", "emb__1__fp32", "emb__5__fp32"]
    async with EdgeNode(edge_config(tmp_path, keys, fleet=fleet)) as node:
        assert [(m.ref.name, m.ref.version) for m in node.models.all()] == [("clf", 2), ("emb", 1)]
        assert node.models.previous_of("emb") == emb5.manifest.ref
        assert node.models.previous == clf1.manifest.ref


def test_a_single_model_cache_written_by_the_old_layout_still_loads(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """state.json of a single-model build ({"current", "previous"}) loads as one slot, and
    the new state.json keeps those top-level keys for the default model."""
    import json
    import shutil

    clf = make_transformer_bundle(tmp_path / "clf", keys.key, name="clf")
    cfg = edge_config(tmp_path, keys, fleet=fleet)
    cache = cfg.data_path / "models"
    cache.mkdir(parents=True)
    shutil.copytree(clf.path, cache / "clf__1__fp32")
    (cache / "state.json").write_text(json.dumps({"current": "clf__1__fp32"}))

    async def main() -> None:
        emb = make_transformer_bundle(tmp_path / "emb", keys.key, task="embedding", name="emb")
        async with EdgeNode(cfg) as node:
            assert node.models.names == ["clf"]
            await node.models.install(emb.path, source="test")
        state = json.loads((cache / "state.json").read_text())
        assert state["current"] == "clf__1__fp32"
        assert [(e["name"], e["current"]) for e in state["models"]] == [
            ("clf", "clf__1__fp32"),
            ("emb", "emb__1__fp32"),
        ]

    anyio.run(main)


@pytest.mark.anyio
async def test_models_served_together_must_fit_the_memory_budget_summed(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """Issue 11: memory is checked over every model a node serves, not per bundle. With a
    300 MB budget a 200 MB classifier and a 150 MB embedder each fit alone but not together:
    the embedder is refused (``too_large``, naming the classifier and the sum) and the node
    keeps serving; a new classifier version replaces the old one's share (250 MB fits); a
    restart with a smaller budget loads only what fits."""
    from slmops.shared.errors import BundleError

    clf1 = make_transformer_bundle(tmp_path / "clf1", keys.key, name="clf", min_memory_mb=200)
    clf2 = make_transformer_bundle(tmp_path / "clf2", keys.key, name="clf", version=2, min_memory_mb=250)
    emb = make_transformer_bundle(tmp_path / "emb", keys.key, task="embedding", name="emb", min_memory_mb=150)
    small = make_transformer_bundle(
        tmp_path / "small", keys.key, task="embedding", name="e2", min_memory_mb=50
    )
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=clf1.path, memory_mb=300)
    async with EdgeNode(cfg) as node:
        with pytest.raises(BundleError) as err:
            await node.models.install(emb.path, source="test")
        assert err.value.code == "too_large"
        assert err.value.reason == (
            "needs 150 MB of memory beside the models served with it (clf 200 MB): "
            "350 MB in all, over this device's 300 MB"
        )
        assert node.models.names == ["clf"]
        assert (await node.predict(["alpha"]))[0].model.name == "clf"
        await node.models.install(clf2.path, source="test")  # 250 replaces 200: fits alone
        await node.models.install(small.path, source="test")  # 250 + 50 = 300: fits
        assert [(m.ref.name, m.ref.version) for m in node.models.all()] == [("clf", 2), ("e2", 1)]
        assert node._snapshot("periodic").device.memory_mb == 300
    # Restart with 280 MB: the default (250) loads, the second (50 more) is refused.
    async with EdgeNode(edge_config(tmp_path, keys, fleet=fleet, memory_mb=280)) as node:
        assert node.models.names == ["clf"]


def test_a_node_reports_its_device_profile_and_holds_models_to_its_memory(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """Issue 12: a node configured with a device profile reports its name in its status and
    holds its models to the profile's memory; a bad profile file is a config error naming
    the file and the key."""
    from slmops.shared.errors import ConfigError

    repo = Path(__file__).resolve().parents[1]
    big = make_transformer_bundle(tmp_path / "big", keys.key, name="big", min_memory_mb=600)
    clf = make_transformer_bundle(tmp_path / "clf", keys.key, name="clf", min_memory_mb=200)

    async def main() -> None:
        cfg = edge_config(
            tmp_path, keys, fleet=fleet, model=clf.path, profile=str(repo / "deploy/profiles/till.toml")
        )
        async with EdgeNode(cfg) as node:
            device = node._snapshot("periodic").device
            assert (device.profile, device.memory_mb) == ("till", 512)
            from slmops.shared.errors import BundleError

            with pytest.raises(
                BundleError, match=r"needs 600 MB of memory beside .* over this device's 512 MB"
            ):
                await node.models.install(big.path, source="test")

    anyio.run(main)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (repo / "deploy/profiles/till.toml").read_text().replace("memory_mb = 512", "memory_mb = -1")
    )
    with pytest.raises(ConfigError, match=r"bad\.toml.*memory_mb"):
        EdgeNode(edge_config(tmp_path, keys, fleet=fleet, node="n2", profile=str(bad)))


@pytest.mark.anyio
async def test_each_model_served_side_by_side_is_watched_and_rolled_back_on_its_own(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """Issue 11: the safety monitor judges every served model, each on its own counters.
    With DEFAULT ``SafetyLimits`` a node serving a classifier (the default) and an embedder
    swaps the embedder to a signed v2 that passes its smoke tests but gives a non-finite
    output for one word; with one embed request in five failing (and the classifier's
    traffic healthy) the node itself rolls the embedder back to v1 and blocks emb/2, and
    leaves the classifier alone. Before: only the default model was watched, and v2 stayed."""
    from slmops.edge.config import SafetyLimits
    from slmops.edge.inference import InferenceFailed

    clf = make_transformer_bundle(tmp_path / "clf", keys.key, name="clf")
    emb1 = make_transformer_bundle(tmp_path / "emb1", keys.key, task="embedding", name="emb")
    emb2 = make_transformer_bundle(
        tmp_path / "emb2", keys.key, task="embedding", name="emb", version=2, nan_word="nanword"
    )
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=clf.path, models=[str(emb1.path)])
    assert cfg.safety == SafetyLimits()
    async with EdgeNode(cfg) as node:
        await node.models.install(emb2.path, source="test")
        assert node.safety.statistics().watching_models == ("emb/2",)
        assert node.safety.statistics().watching is False  # the default model was not swapped

        async def emb_back_on_v1() -> bool:
            await node.predict(["alpha words"] * 4)
            await node.embed(["alpha words"] * 4)
            with contextlib.suppress(InferenceFailed):
                await node.embed(["a nanword here"])
            return node.models.get("emb").ref.version == 1  # type: ignore[union-attr]

        await wait_until(emb_back_on_v1, 60, what="the embedder rolled back to v1")
        assert node.safety.statistics().blocked == ("emb/2",)
        assert node.safety.statistics().rollbacks == 1
        assert [(m.ref.name, m.ref.version) for m in node.models.all()] == [("clf", 1), ("emb", 1)]
        assert node.safety.is_blocked(emb2.manifest.ref)
        assert not node.safety.is_blocked(clf.manifest.ref)
