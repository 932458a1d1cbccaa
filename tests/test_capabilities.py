"""Runtime capabilities (issue 11): a bundle declares what it needs, a node reports what it can
run, and no node is sent a bundle it cannot run: a node-specific assignment is refused by the
registry, a node refuses a fleet-wide one from the small index before downloading, and fleet
status says so. Old nodes (06cfd20, n-gram only) beside this cloud, and this node beside an
old registry."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import pytest
from _delivery import Delivery
from _transformer import make_transformer_bundle
from fixtures.messages_06cfd20 import DeviceProfile as OldDevice
from fixtures.messages_06cfd20 import NodeStatus as OldStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import errors as js_errors

from _edge_util import Keys, edge_config
from _models import make_bundle
from _nats import wait_until
from slmops.cloud.config import CloudConfig
from slmops.cloud.ingest.query import fleet_status
from slmops.cloud.registry import Registry, RegistryError
from slmops.cloud.service import CloudService
from slmops.edge.node import EdgeNode
from slmops.shared import names
from slmops.shared.bundle import MANIFEST_FILE, read_bundle, resign_bundle
from slmops.shared.capabilities import CAPABILITIES
from slmops.shared.messages import (
    Assignment,
    BundleIndex,
    DeviceProfile,
    ModelRef,
    NodeStatus,
    Requirements,
    decode_json,
    encode_json,
)
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio
FIXTURES = Path(__file__).parent / "fixtures"


async def _status(js: JetStreamContext, fleet: str, node: str, payload: bytes) -> None:
    await js.publish(names.status_subject(fleet, node), payload)


async def test_assign_never_sends_a_node_a_bundle_its_runtime_cannot_run(d: Delivery) -> None:
    await d.push(make_transformer_bundle(d.tmp / "tf", d.keys.key, name=d.model))
    await d.push(make_bundle(d.tmp / "ng", d.keys.key, name=d.model, version=2))
    now = datetime.now(UTC)
    # An old node's status, in the very format 06cfd20 publishes (no capabilities field).
    old = OldStatus(fleet=d.fleet, node="old", time=now, device=OldDevice(memory_mb=4096))
    await _status(d.js, d.fleet, "old", msgspec.json.encode(old))
    new = NodeStatus(
        fleet=d.fleet, node="new", time=now, device=DeviceProfile(memory_mb=4096, capabilities=CAPABILITIES)
    )
    await _status(d.js, d.fleet, "new", encode_json(new))
    with pytest.raises(RegistryError) as info:
        await d.assign(1, node="old")
    assert str(info.value) == (
        f"registry assign: node 'old' can run no variant of {d.model!r} v1: fp32 needs "
        "preprocessing 'tokenizer', multi-file bundles, runtime level 2 (has 1)"
    )
    with pytest.raises(
        RegistryError, match=r"node 'old' cannot run .* v1 fp32: it lacks preprocessing 'tokenizer'"
    ):
        await d.assign(1, node="old", variant="fp32")
    assert (await d.assign(1, node="new")).variant == "fp32"
    assert (await d.assign(2, node="old")).variant == "fp32"  # n-gram: fine


async def test_old_nodes_find_no_archive_of_a_bundle_they_cannot_run(d: Delivery) -> None:
    """Nodes of 06cfd20 fetch ``<model>/<version>/<variant>`` archives: the registry stores
    one only for bundles they can run, so they never download a transformer bundle."""
    await d.push(make_transformer_bundle(d.tmp / "tf", d.keys.key, name=d.model))
    await d.push(make_bundle(d.tmp / "ng", d.keys.key, name=d.model, version=2))
    store = await d.js.object_store(names.MODELS_BUCKET)
    with pytest.raises(js_errors.NotFoundError):
        await store.get_info(names.model_object_name(d.model, 1, "fp32"))
    archive = await store.get(names.model_object_name(d.model, 2, "fp32"))
    with tarfile.open(fileobj=io.BytesIO(archive.data or b"")) as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx"]  # what 06cfd20 unpacks
    # The cloud itself still gets either bundle back (recalibration reads them).
    back = await d.registry.fetch_bundle(d.model, 1, "fp32", d.tmp / "back")
    assert back.raw == read_bundle(d.tmp / "tf").raw
    assert sorted(f.path for f in back.files) == ["encoder.onnx", "head.onnx", "tokenizer.json"]


async def _store_like_a_newer_registry(js: JetStreamContext, bundle_dir: Path) -> None:
    """What a later registry would write for a bundle this build cannot verify as runnable
    (push would refuse it): files by sha256, the manifest object, the index, the manifest."""
    b = read_bundle(bundle_dir)
    store = await js.object_store(names.MODELS_BUCKET)
    for f in b.files:
        await store.put(names.file_object_name(f.sha256), (b.path / f.path).read_bytes())
    sha = hashlib.sha256(b.raw).hexdigest()
    await store.put(names.file_object_name(sha), b.raw)
    m = b.manifest
    kv = await js.key_value(names.MODELS_MANIFEST_BUCKET)
    index = BundleIndex(
        name=m.name, version=m.version, variant=m.variant, manifest_sha256=sha, manifest_size=len(b.raw),
        requires=m.requires, files_bytes=sum(f.size_bytes for f in b.files),
    )  # fmt: skip
    await kv.put(names.bundle_index_key(m.name, m.version, m.variant), encode_json(index))
    await kv.put(names.manifest_key(m.name, m.version, m.variant), b.raw)


async def test_a_node_refuses_a_bundle_for_a_newer_runtime_before_downloading_and_fleet_status_says_so(
    d: Delivery, nc: NATS
) -> None:
    b = make_transformer_bundle(d.tmp / "future", d.keys.key, name=d.model)
    future = msgspec.structs.replace(
        b.manifest,
        requires=Requirements(
            preprocessing="tokenizer", task="classification", multi_file=True, min_runtime=3
        ),
    )
    (b.path / MANIFEST_FILE).write_bytes(msgspec.json.encode(future))
    resign_bundle(b.path, d.keys.key)
    await _store_like_a_newer_registry(d.js, b.path)
    config = CloudConfig(nats_url=d.server.url, state_dir=str(d.tmp / "cloud"), fleets=[d.fleet])
    cfg = d.config()
    async with CloudService(config) as svc, EdgeNode(cfg) as node:
        await svc.wait_active(30)
        await node.link.wait_online(10)
        await d.assign(1)  # fleet-wide: the node judges
        await wait_until(lambda: node.refresher.stats.rejections >= 1, 20, what="refusal")
        assert node.refresher.stats.bytes_downloaded == 0
        last = node.refresher.stats.last
        assert last is not None
        assert (last.code, last.reason) == (
            "incompatible",
            "this runtime can run none of the variants: "
            "{'fp32': ['runtime level 3 (has 2)']} (not downloaded)",
        )

        async def said() -> bool:
            snaps = [s for s in await fleet_status(nc, d.fleet) if s.node == "n1"]
            return bool(snaps) and snaps[0].cannot_run is not None

        await wait_until(said, 30, what="fleet status naming the refusal")
        (snap,) = [s for s in await fleet_status(nc, d.fleet) if s.node == "n1"]
        assert snap.cannot_run is not None
        assert "runtime level 3 (has 2)" in snap.cannot_run
        assert snap.capabilities == CAPABILITIES


async def test_this_node_installs_a_bundle_from_an_old_registry(
    js: JetStreamContext, nats_server: EmbeddedServer, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """The reverse: a registry of 06cfd20 stored the archive and the manifest in KV (no index,
    no files by sha256); this node fetches the archive and runs the bundle it signed."""
    old = read_bundle(FIXTURES / "old_bundle_06cfd20")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in (MANIFEST_FILE, "model.onnx"):
            tar.add(old.path / name, arcname=name)
    store = await js.object_store(names.MODELS_BUCKET)
    await store.put(names.model_object_name("oldclf", 3, "fp32"), buf.getvalue())
    kv = await js.key_value(names.MODELS_MANIFEST_BUCKET)
    await kv.put(names.manifest_key("oldclf", 3, "fp32"), old.raw)
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, url=nats_server.url, trust=[FIXTURES / "old_bundle_06cfd20.pub"]
    )
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await Registry(js).assign(fleet, 3, model="oldclf", variant="fp32")
        await wait_until(
            lambda: (
                node.models.current is not None
                and node.models.current.ref == ModelRef(name="oldclf", version=3)
            ),
            20,
            what="old bundle installed",
        )
        assert [p.label for p in await node.predict(["about gamma"])] == ["gamma"]


@pytest.fixture(scope="module")
def old_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code of commit 06cfd20 (the last build before runtime capabilities), from git."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("build-06cfd20")
    tar = subprocess.run(
        ["git", "-C", str(root), "archive", "06cfd20", "shared", "edge", "cloud", "slmops"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(out, filter="data")
    return out


async def test_a_06cfd20_node_beside_this_cloud_runs_n_gram_bundles_and_never_fetches_a_transformer(
    d: Delivery, nc: NATS, old_build: Path
) -> None:
    """A real node process of the old build: it installs an n-gram bundle this registry
    pushed (written and signed by this build), and when assigned a transformer bundle it finds
    nothing it could download, says so, and keeps serving the n-gram model."""
    await d.push(make_bundle(d.tmp / "v1", d.keys.key, name=d.model, version=1))
    await d.push(make_transformer_bundle(d.tmp / "v2", d.keys.key, name=d.model, version=2))
    seen: list[NodeStatus] = []

    async def on_msg(msg: Any) -> None:
        seen.append(decode_json(msg.data, NodeStatus))

    sub = await nc.subscribe(names.status_subject(d.fleet, "old1"), cb=on_msg)
    argv = [
        sys.executable, "-m", "slmops.cli", "--log-level", "warning", "edge",
        "--fleet", d.fleet, "--node", "old1", "--data", str(d.tmp / "old-data"),
        "--nats", d.server.url, "--trust", str(d.keys.pub), "--http", "off", "--status-interval", "1s",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(old_build)}
    log = (d.tmp / "old-node.log").open("wb")
    proc = subprocess.Popen(argv, cwd=old_build, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        await d.assign(1)

        def installed(version: int) -> bool:
            return any(s.model is not None and s.model.version == version for s in seen)

        await wait_until(lambda: installed(1), 60, what="the old node installed the n-gram bundle")
        await d.assign(2)

        def refused() -> list[str]:
            return [
                s.refresh.reason
                for s in seen
                if s.refresh is not None and not s.refresh.ok and s.refresh.model.version == 2
            ]

        await wait_until(lambda: bool(refused()), 60, what="the old node reporting v2 unavailable")
        assert "no such object in the model store" in refused()[0]
        assert proc.poll() is None
        assert seen[-1].model is not None
        assert seen[-1].model.version == 1
        assert not installed(2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        await sub.unsubscribe()


async def test_a_fleet_wide_assignment_keeps_old_nodes_on_the_newest_version_they_can_run(
    d: Delivery,
) -> None:
    """Fleet-wide v2 (a transformer) while the fleet has old n-gram nodes: the old node gets a
    key of its own naming v1 (n-gram, the newest it can run) instead of failing on v2; a new
    node follows the fleet key; an old node of a model it can run no version of is named.
    The old statuses are in the very format 06cfd20 publishes."""
    from click.testing import CliRunner

    from slmops.cli import main

    await d.push(make_bundle(d.tmp / "ng", d.keys.key, name=d.model, version=1))
    await d.push(make_transformer_bundle(d.tmp / "tf", d.keys.key, name=d.model, version=2))
    only_tf = f"{d.model}-tf"
    await d.push(make_transformer_bundle(d.tmp / "tf2", d.keys.key, name=only_tf, version=1))
    now = datetime.now(UTC)
    for node in ("old1", "old2"):
        old = OldStatus(fleet=d.fleet, node=node, time=now, device=OldDevice(memory_mb=4096))
        await _status(d.js, d.fleet, node, msgspec.json.encode(old))
    new = NodeStatus(
        fleet=d.fleet, node="new", time=now, device=DeviceProfile(memory_mb=4096, capabilities=CAPABILITIES)
    )
    await _status(d.js, d.fleet, "new", encode_json(new))
    kv = await d.js.key_value(names.ASSIGNMENTS_BUCKET)
    own_old2 = Assignment(
        fleet=d.fleet, node="old2", model=d.model, version=1, variant="fp32", assigned_at=now
    )
    await kv.put(names.assignment_key(d.fleet, "old2"), encode_json(own_old2))  # its own: untouched

    async def cli(*args: str) -> str:
        argv = ["models", "assign", "--nats", d.server.url, "--fleet", d.fleet, *args]
        result = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, argv))
        assert result.exit_code == 0, result.output
        return result.output

    out = await cli("--model", only_tf, "--version", "1")
    lacks = "its runtime lacks multi-file bundles, preprocessing 'tokenizer'"
    assert f"node old1: can run no version of {only_tf!r}; {lacks}" in out
    assert "old2" not in out  # it follows its own key
    with pytest.raises(js_errors.KeyNotFoundError):
        await kv.get(names.assignment_key(d.fleet, "old1"))  # nothing it could run: no key written

    out = await cli("--model", d.model, "--version", "2")
    assert f"assigned {d.model} v2" in out
    assert "node old1: kept on v1 (fp32), the newest it can run; its runtime lacks " in out
    assert "capabilities none reported: an old node" in out
    assert "old2" not in out
    assert "node new" not in out
    pinned = decode_json((await kv.get(names.assignment_key(d.fleet, "old1"))).value or b"", Assignment)
    assert (pinned.model, pinned.version, pinned.variant) == (d.model, 1, "fp32")
    assert (
        decode_json((await kv.get(names.assignment_key(d.fleet, "old2"))).value or b"", Assignment)
        == own_old2
    )
    with pytest.raises(js_errors.KeyNotFoundError):
        await kv.get(names.assignment_key(d.fleet, "new"))
    fleet_wide = decode_json((await kv.get(names.assignment_key(d.fleet))).value or b"", Assignment)
    assert (fleet_wide.model, fleet_wide.version) == (d.model, 2)
