"""``slmops bench refresh``: model delivery, measured against the bare libraries in the same run.

- ``refresh_online``: fleet-wide assignment → every one of N followers serving the new version
  (each follower is a real ``edge.refresh.Refresher`` + ``edge.models.ModelManager`` with its own
  NATS connection and model cache: watch, download, verify, ORT load, smoke test, swap).
  Baseline: N concurrent bare ``object_store.get(writeinto=file)`` of the same bundle.
- ``refresh_reconnect``: all N links cut while a version is assigned, then restored at once:
  restore → all serving it. Baseline: restore → all N links back online (nats-py reconnect).
- ``refresh_delivery``: MB/s of one node's download (``Refresher.download``: get into a temp
  file under a timeout, then unpack) vs a bare ``object_store.get`` into a file.
- ``refresh_int8_size`` / ``refresh_int8_speed``: the factory model's int8 variant vs fp32.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.build import build, classifier_manifest, factory_split
from slmops.cloud.factory.graph import build_classifier
from slmops.cloud.factory.profile import smoke_tests
from slmops.cloud.factory.quantize import quantize
from slmops.cloud.registry import Registry
from slmops.edge.models import ModelManager
from slmops.edge.refresh import Refresher
from slmops.netproxy import TcpProxy
from slmops.shared import names
from slmops.shared.bundle import Bundle, TrustStore, write_bundle
from slmops.shared.connect import Link, LinkState
from slmops.shared.messages import ModelManifest, ModelRef, Preprocessing
from slmops.shared.provision import ensure_resources
from slmops.shared.runtime import load_session
from slmops.shared.server import EmbeddedServer

__all__ = ["run"]

FLEET = "bench"
MB = 1024 * 1024


class _Follower:
    """A lightweight node: link, model cache and refresher, nothing else."""

    def __init__(self, i: int, url: str, cache: Path, trust: TrustStore) -> None:
        self.name = f"n{i:03d}"
        self.link = Link(url, name=f"bench-{self.name}", fleet=FLEET, node=self.name)
        self.swapped: dict[int, float] = {}

        async def register(manifest: ModelManifest) -> int:
            return manifest.version

        async def report(event: str, **fields: Any) -> bool:
            return True

        self.models = ModelManager(cache, trust, register=register)
        self.models.on_change(
            lambda event, active: self.swapped.setdefault(active.ref.version, time.perf_counter())
        )
        self.refresher = Refresher(
            fleet=FLEET, node=self.name, link=self.link, models=self.models, report=report
        )

    def serving(self, version: int) -> bool:
        current = self.models.current
        return current is not None and current.ref.version == version


async def _wait_all(pred: Any, timeout: float, what: str) -> None:
    # Polled: the conditions span 50 independent objects, none of which signals "all done".
    with anyio.fail_after(timeout):
        while True:
            if pred():
                return
            await anyio.sleep(0.005)


def _big_bundle(out: Path, key: Ed25519PrivateKey, size_mb: int) -> Bundle:
    """A valid bundle of about ``size_mb`` MB (a random embedding), for delivery speed."""
    dim, labels = 32, ["a", "b", "c"]
    buckets = max(1024, size_mb * MB // (dim * 4))
    pp = Preprocessing(buckets=buckets, max_tokens=32, word_ngrams=[1], char_ngrams=[])
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 0.1, (buckets, dim)).astype(np.float32)
    emb[0] = 0
    w = rng.normal(0, 0.1, (dim, len(labels))).astype(np.float32)
    model = build_classifier(emb, w, np.zeros(len(labels), np.float32), max_tokens=pp.max_tokens)
    manifest = classifier_manifest(name="benchbig", version=1, labels=labels, preprocessing=pp)
    (out / "tmp").mkdir(parents=True)
    (out / "tmp" / "model.onnx").write_bytes(model)
    session = load_session(out / "tmp" / "model.onnx", manifest)
    manifest = ModelManifest(
        **{**_fields(manifest), "smoke_tests": smoke_tests(session, ["x y", "z"], tolerance=1e-4)}
    )
    return write_bundle(out / "big", model, manifest, key)


def _fields(m: ModelManifest) -> dict[str, Any]:
    return {f: getattr(m, f) for f in m.__struct_fields__}


async def _bare_get(registry_js: Any, obj: str, path: Path) -> int:
    store = await registry_js.object_store(names.MODELS_BUCKET)
    with path.open("wb") as f:
        await store.get(obj, writeinto=f)
        return f.tell()


async def run(quick: bool = False) -> list[dict[str, object]]:
    n_nodes = 5 if quick else 50
    big_mb = 2 if quick else 32
    key = Ed25519PrivateKey.generate()
    trust = TrustStore([key.public_key()])
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="slmops-bench-refresh-") as tmp_name:
        tmp = Path(tmp_name)
        bundles = [build(tmp / f"v{v}", key, version=v, seed=v - 1).bundle for v in (1, 2, 3)]
        split = factory_split(bundles[0].manifest)
        assert split is not None
        q = quantize(
            bundles[0].path,
            tmp / "v1-int8",
            key,
            eval_texts=split.held_out_texts + split.train_texts,
            held_out=(split.held_out_texts, split.held_out_labels),
        )
        detail = {"top1_agreement": q.agreement, "max_prob_diff": q.max_prob_diff, "setting": q.setting}
        results.append(
            {
                "scenario": "refresh_int8_size",
                "project": q.int8_bytes,
                "baseline": q.fp32_bytes,
                "ratio": q.size_ratio,
                "units": "bytes (int8 vs fp32)",
                **detail,
            }
        )
        results.append(
            {
                "scenario": "refresh_int8_speed",
                "project": q.int8_us,
                "baseline": q.fp32_us,
                "ratio": q.speed_ratio,
                "units": "µs/call (int8 vs fp32)",
                **detail,
            }
        )
        big = _big_bundle(tmp / "bigbundle", key, big_mb)
        async with EmbeddedServer(store_dir=tmp / "js") as server:
            results += await _measure(server, tmp, trust, bundles, big, n_nodes)
    return results


async def _measure(
    server: EmbeddedServer, tmp: Path, trust: TrustStore, bundles: list[Bundle], big: Bundle, n_nodes: int
) -> list[dict[str, object]]:
    import nats

    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await ensure_resources(js)
        registry = Registry(js, url=server.url)
        for b in [*bundles, big]:
            await registry.push(b, trust)
        out = [await _delivery(js, tmp, big, trust)]
        async with TcpProxy("127.0.0.1", server.port) as proxy, AsyncExitStack() as stack:
            followers = [_Follower(i, proxy.url, tmp / "nodes" / f"n{i:03d}", trust) for i in range(n_nodes)]
            for f in followers:
                await f.models.open()
                await f.models.install(bundles[0].path, source="local")
                await stack.enter_async_context(f.link)
            tg = await stack.enter_async_context(anyio.create_task_group())
            for f in followers:
                tg.start_soon(f.refresher.run)
            await _wait_all(lambda: all(f.link.state is LinkState.ONLINE for f in followers), 60, "online")
            out.append(await _online(js, tmp, registry, followers, bundles[1].manifest.ref))
            out.append(await _reconnect(proxy, registry, followers, bundles[2].manifest.ref))
            tg.cancel_scope.cancel()
        return out
    finally:
        await nc.close()


async def _online(
    js: Any, tmp: Path, registry: Registry, followers: list[_Follower], ref: ModelRef
) -> dict[str, object]:
    t0 = time.perf_counter()
    await registry.assign(FLEET, ref.version, model=ref.name)
    await _wait_all(lambda: all(f.serving(ref.version) for f in followers), 300, "online refresh")
    project = time.perf_counter() - t0
    per_node = sorted(f.swapped[ref.version] - t0 for f in followers)
    obj = names.model_object_name(ref.name, ref.version, ref.variant)
    t1 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(followers)):
            tg.start_soon(_bare_get, js, obj, tmp / f"bare-{i}.tar")
    baseline = time.perf_counter() - t1
    return {
        "scenario": "refresh_online",
        "project": project,
        "baseline": baseline,
        "ratio": project / baseline,
        "units": "s to all nodes (baseline: bare concurrent gets)",
        "nodes": len(followers),
        "p50_node_s": statistics.median(per_node),
        "bundle_bytes": ref_size(followers, ref),
    }


def ref_size(followers: list[_Follower], ref: ModelRef) -> int:
    current = followers[0].models.current
    return 0 if current is None else current.manifest.size_bytes


async def _reconnect(
    proxy: TcpProxy, registry: Registry, followers: list[_Follower], ref: ModelRef
) -> dict[str, object]:
    await proxy.cut()
    await _wait_all(lambda: all(f.link.state is not LinkState.ONLINE for f in followers), 60, "offline")
    await registry.assign(FLEET, ref.version, model=ref.name)
    t0 = time.perf_counter()
    await proxy.restore()
    await _wait_all(lambda: all(f.link.state is LinkState.ONLINE for f in followers), 120, "reconnected")
    baseline = time.perf_counter() - t0
    await _wait_all(lambda: all(f.serving(ref.version) for f in followers), 300, "refresh after reconnect")
    project = time.perf_counter() - t0
    per_node = sorted(f.swapped[ref.version] - t0 for f in followers)
    return {
        "scenario": "refresh_reconnect",
        "project": project,
        "baseline": baseline,
        "ratio": project / baseline,
        "units": "s from restore to all nodes (baseline: all links online)",
        "nodes": len(followers),
        "p50_node_s": statistics.median(per_node),
    }


async def _delivery(js: Any, tmp: Path, big: Bundle, trust: TrustStore) -> dict[str, object]:
    ref = big.manifest.ref
    obj = names.model_object_name(ref.name, ref.version, ref.variant)

    async def noop(event: str, **fields: Any) -> bool:
        return True

    async def register(m: ModelManifest) -> int:
        return 1

    dummy_link = Link("nats://127.0.0.1:1")  # download() takes the JetStream context directly
    refresher = Refresher(
        fleet=FLEET,
        node="dl",
        link=dummy_link,
        report=noop,
        models=ModelManager(tmp / "dl-cache", trust, register=register),  # unpacked signature-first
    )
    project: list[float] = []
    baseline: list[float] = []
    size = 0
    for i in range(3):  # alternate, so machine noise hits both alike
        t0 = time.perf_counter()
        size = await _bare_get(js, obj, tmp / f"bare-big-{i}.tar")
        baseline.append(size / MB / (time.perf_counter() - t0))
        work = tmp / f"dl-{i}"
        work.mkdir()
        t0 = time.perf_counter()
        await refresher.download(js, ref, work)
        project.append(size / MB / (time.perf_counter() - t0))
    p, b = statistics.median(project), statistics.median(baseline)
    return {
        "scenario": "refresh_delivery",
        "project": p,
        "baseline": b,
        "ratio": p / b,
        "units": "MB/s (download+unpack vs bare get into a file)",
        "archive_mb": round(size / MB, 2),
    }
