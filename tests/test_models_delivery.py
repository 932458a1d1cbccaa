"""Model delivery (issue 11 content-addressed files; issue 13 fault 8): the registry stores
bundle files by sha256 and a node fetches only files it does not hold; downloads resume where
a cut link left them; a slow steady link delivers a bundle whose manifest is large; the
signature is checked before any file is fetched; every failure is reported as
``download_failed`` with the reason. All through the repo's TCP proxy, default settings."""

from __future__ import annotations

import hashlib

import anyio
import pytest
from _delivery import Delivery, serving
from _transformer import make_transformer_bundle

from _nats import wait_until
from _proxy import TcpProxy
from slmops.edge.node import EdgeNode
from slmops.shared import names
from slmops.shared.messages import BundleIndex, decode_json, encode_json

pytestmark = pytest.mark.anyio


async def test_a_new_version_changing_only_the_head_ships_only_the_head(d: Delivery) -> None:
    v1 = make_transformer_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model, extra_data=300_000)
    v2 = make_transformer_bundle(
        d.tmp / "v2", d.keys.key, version=2, name=d.model, extra_data=300_000, bias=[0.5, 0, 0]
    )
    same = {f.path for f in v1.files if f.sha256 in {g.sha256 for g in v2.files}}
    assert same == {"encoder.onnx", "tokenizer.json", "weights.bin"}
    await d.push(v1)
    await d.push(v2)
    store = await d.js.object_store(names.MODELS_BUCKET)
    for f in v2.files:  # one object per distinct file, named by its sha256
        info = await store.get_info(names.file_object_name(f.sha256))
        assert info.size == f.size_bytes
    cfg = d.config()
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await d.assign(1, variant="fp32")
        await wait_until(lambda: serving(node) == d.ref(1), 20, what="v1 installed")
        stats = node.refresher.stats
        first = stats.bytes_downloaded
        assert first >= sum(f.size_bytes for f in v1.files)
        await d.assign(2, variant="fp32")
        await wait_until(lambda: serving(node) == d.ref(2), 20, what="v2 installed")
        head = next(f for f in v2.files if f.path == "head.onnx")
        second = stats.bytes_downloaded - first
        assert second == head.size_bytes + len(v2.raw)  # the head and the manifest, nothing else
        assert stats.files_reused == 3
        assert [p.label for p in await node.predict(["alpha", "gamma"])] == ["alpha", "gamma"]


async def test_a_cut_link_resumes_the_download_where_it_stopped(d: Delivery) -> None:
    """Fault 8: each attempt used to restart at byte 0. The link (200 kB/s) is cut twice
    in the middle of a 1.5 MB bundle; the node reports each interrupted attempt as
    download_failed and fetches the bundle about once in total."""
    b = make_transformer_bundle(d.tmp / "big", d.keys.key, version=1, name=d.model, extra_data=1_500_000)
    await d.push(b)
    total = sum(f.size_bytes for f in b.files) + len(b.raw)
    async with TcpProxy("127.0.0.1", d.server.port, rate=200_000) as proxy:
        cfg = d.config(url=proxy.url)
        async with EdgeNode(cfg) as node:
            await node.link.wait_online(10)
            await d.assign(1, variant="fp32")
            stats = node.refresher.stats
            for mark in (0.3, 0.6):
                await wait_until(
                    lambda m=mark: stats.bytes_downloaded > m * total, 30, what=f"{mark:.0%} fetched"
                )
                await proxy.cut()
                await anyio.sleep(0.5)
                await proxy.restore()
            await wait_until(lambda: serving(node) == d.ref(1), 60, what="installed")
            assert stats.bytes_downloaded < 1.15 * total  # resumed, not restarted
            await wait_until(
                lambda: len(d.statuses.failures()) >= 2, 10, what="interrupted attempts reported"
            )
            assert all("interrupted" in r for r in d.statuses.failures())
            assert not (node.models.cache_dir / ".partial").exists()


async def test_a_slow_steady_link_delivers_a_bundle_with_a_large_manifest(d: Delivery) -> None:
    """Fault 8: at ~8 kB/s, reading a 51 KB manifest from KV outlasted nats-py's 5 s request
    timeout and crashed the refresher. The node reads the small index from KV and the manifest
    as a chunked object; a 60 KB manifest and its bundle arrive with default settings."""
    b = make_transformer_bundle(d.tmp / "b", d.keys.key, version=1, name=d.model, notes="x" * 60_000)
    assert len(b.raw) > 60_000
    await d.push(b)
    async with TcpProxy("127.0.0.1", d.server.port, rate=8_000) as proxy:
        cfg = d.config(url=proxy.url)
        async with EdgeNode(cfg) as node:
            await node.link.wait_online(20)
            await d.assign(1)
            await wait_until(lambda: serving(node) == d.ref(1), 100, what="installed")
            assert d.statuses.rejected() == []


async def test_a_forged_manifest_is_refused_before_any_file_is_fetched(d: Delivery) -> None:
    """A registry serving a manifest edited after signing (labels swapped): the node checks
    the signature on the manifest object it fetched and downloads nothing else."""
    b = make_transformer_bundle(d.tmp / "b", d.keys.key, version=1, name=d.model, extra_data=200_000)
    await d.push(b)
    forged = b.raw.replace(b'"alpha"', b'"omega"')
    store = await d.js.object_store(names.MODELS_BUCKET)
    sha = hashlib.sha256(forged).hexdigest()
    await store.put(names.file_object_name(sha), forged)
    kv = await d.js.key_value(names.MODELS_MANIFEST_BUCKET)
    key = names.bundle_index_key(d.model, 1, "fp32")
    index = decode_json((await kv.get(key)).value or b"", BundleIndex)
    index.manifest_sha256, index.manifest_size = sha, len(forged)
    await kv.put(key, encode_json(index))
    cfg = d.config()
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await d.assign(1, variant="fp32")
        await wait_until(lambda: bool(d.statuses.rejected()), 20, what="rejection")
        assert d.statuses.rejected()[0][0] == "bad_signature"
        assert node.refresher.stats.bytes_downloaded == len(forged)
        assert serving(node) is None


async def test_an_object_larger_than_its_signed_size_is_not_fetched(d: Delivery) -> None:
    """The object store holds 10 MB under the encoder's sha256 (damaged after the push): refused
    from its size, with a download_failed status naming the object and both sizes. The encoder
    is every test bundle's: a push puts it back at the end (the session's store is shared)."""
    b = make_transformer_bundle(d.tmp / "b", d.keys.key, version=1, name=d.model)
    enc = next(f for f in b.files if f.path == "encoder.onnx")
    await d.push(b)
    store = await d.js.object_store(names.MODELS_BUCKET)
    await store.put(names.file_object_name(enc.sha256), b"\0" * 10_000_000)
    try:
        cfg = d.config()
        async with EdgeNode(cfg) as node:
            await node.link.wait_online(10)
            await d.assign(1, variant="fp32")
            await wait_until(lambda: bool(d.statuses.failures()), 20, what="download_failed status")
            reason = d.statuses.failures()[0]
            assert f"is 10000000 bytes, the signed manifest lists {enc.size_bytes}" in reason
            assert node.refresher.stats.bytes_downloaded < 1_000_000
    finally:
        await d.push(b)
    assert (await store.get_info(names.file_object_name(enc.sha256))).size == enc.size_bytes
