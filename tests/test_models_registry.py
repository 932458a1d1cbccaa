"""Registry on a real server: push verifies and stores, versions are immutable, list, assign
(fleet-wide and per node, variant by device profile); `slmops models push` refuses every bad
bundle with a non-zero exit naming the reason, and stores nothing."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from _bad_bundles import BAD_BUNDLES, resign
from _transformer import make_transformer_bundle
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from _models import make_bundle
from _nats import new_fleet
from slmops.cli import main
from slmops.cloud.registry import Registry, RegistryError
from slmops.shared import names
from slmops.shared.bundle import (
    TrustStore,
    load_private_key,
    new_keypair,
    pack_archive,
    read_bundle,
    unpack_archive,
)
from slmops.shared.errors import BundleError
from slmops.shared.kv import kv_keys
from slmops.shared.messages import Assignment, DeviceProfile, NodeStatus, decode_json, encode_json
from slmops.shared.server import EmbeddedServer
from slmops.shared.variants import choose_variant

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _model_name() -> str:
    # Each test pushes its own model name, so tests sharing the session server stay apart.
    return "m" + new_fleet()[2:]


async def test_push_stores_archive_and_manifest_and_is_idempotent(
    js: JetStreamContext, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    name = _model_name()
    bundle = make_bundle(tmp_path / "b", key, version=1, name=name)
    registry = Registry(js)
    trust = TrustStore([key.public_key()])
    first = await registry.push(bundle, trust)
    assert first.stored
    assert first.object_name == f"{name}/1/fp32"
    again = await registry.push(bundle, trust)
    assert not again.stored
    assert await registry.manifest(name, 1, "fp32") == bundle.manifest
    obs = await js.object_store(names.MODELS_BUCKET)
    archive = tmp_path / "archive.tar"
    with archive.open("wb") as f:
        await obs.get(first.object_name, writeinto=f)
    got = unpack_archive(archive, tmp_path / "unpacked")
    assert got.manifest == bundle.manifest
    assert got.model_path.read_bytes() == bundle.model_path.read_bytes()
    listed = [m for m in await registry.manifests() if m.name == name]
    assert [(m.version, m.variant) for m in listed] == [(1, "fp32")]


async def test_a_pushed_version_cannot_be_replaced(
    js: JetStreamContext, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    name = _model_name()
    registry = Registry(js)
    trust = TrustStore([key.public_key()])
    await registry.push(make_bundle(tmp_path / "a", key, version=1, name=name), trust)
    other = make_bundle(tmp_path / "b", key, version=1, name=name, bias=[0.1, 0.0, 0.0])
    with pytest.raises(RegistryError, match="immutable"):
        await registry.push(other, trust)
    stored = await registry.manifest(name, 1, "fp32")
    assert stored is not None
    assert stored.sha256 != other.manifest.sha256


async def test_push_puts_again_a_file_object_that_holds_other_bytes_than_its_sha256(
    js: JetStreamContext, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """``files/<sha256>`` was trusted by its name: an object there holding other bytes (a
    damaged object, a short one) made every later push skip it, so every bundle sharing that
    file stayed undeliverable for good (nodes refuse it by size or digest, the cloud's
    ``fetch_bundle`` failed with "does not hold the bytes of its sha256"). A push checks each
    existing object's size and digest and puts a wrong one again, saying so; intact objects
    are not written twice."""
    name = _model_name()
    labels = [f"{word}{name}" for word in ("alpha", "beta", "gamma")]  # a tokenizer of its own
    bundle = make_transformer_bundle(tmp_path / "b", key, name=name, labels=labels)
    tokenizer = next(f for f in bundle.files if f.path == "tokenizer.json")
    manifest = names.file_object_name(hashlib.sha256(bundle.raw).hexdigest())
    store = await js.object_store(names.MODELS_BUCKET)
    await store.put(manifest, bundle.raw[: len(bundle.raw) // 2])  # short
    await store.put(names.file_object_name(tokenizer.sha256), b"\0" * tokenizer.size_bytes)  # other bytes
    registry = Registry(js)
    trust = TrustStore([key.public_key()])
    with capture_logs() as logs:
        assert (await registry.push(bundle, trust)).stored
    replaced = {e["object"] for e in logs if e["event"] == "model_file_replaced"}
    assert replaced == {manifest, names.file_object_name(tokenizer.sha256)}
    back = await registry.fetch_bundle(name, 1, "fp32", tmp_path / "back")
    for f in bundle.files:
        assert (back.path / f.path).read_bytes() == (bundle.path / f.path).read_bytes(), f.path
    with capture_logs() as logs:
        assert not (await registry.push(bundle, trust)).stored
    assert [e for e in logs if e["event"] == "model_file_replaced"] == []


async def test_push_refuses_a_bad_bundle_before_writing_anything(
    js: JetStreamContext, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    name = _model_name()
    bundle = make_bundle(tmp_path / "b", key, version=1, name=name)
    (bundle.path / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError) as err:
        await Registry(js).push(bundle, TrustStore([key.public_key()]))
    assert err.value.code == "truncated"
    assert await Registry(js).manifest(name, 1, "fp32") is None


async def _publish_status(js: JetStreamContext, fleet: str, node: str, memory_mb: int) -> None:
    status = NodeStatus(
        fleet=fleet,
        node=node,
        time=datetime.now(UTC),
        event="connect",
        device=DeviceProfile(memory_mb=memory_mb),
    )
    await js.publish(names.status_subject(fleet, node), encode_json(status))


async def _assignment(js: JetStreamContext, fleet: str, node: str | None) -> Assignment:
    kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
    entry = await kv.get(names.assignment_key(fleet, node))
    assert entry.value is not None
    return decode_json(entry.value, Assignment)


async def test_assign_picks_the_variant_from_the_node_device_profile(
    js: JetStreamContext, key: Ed25519PrivateKey, tmp_path: Path, fleet: str
) -> None:
    name = _model_name()
    registry = Registry(js)
    trust = TrustStore([key.public_key()])
    fp32 = make_bundle(tmp_path / "fp32", key, version=4, name=name)
    resign(fp32.path, key, min_memory_mb=256)
    int8 = make_bundle(tmp_path / "int8", key, version=4, name=name, variant="int8")
    resign(int8.path, key, min_memory_mb=64, parent_version=4)
    for path in (fp32.path, int8.path):
        await registry.push(read_bundle(path), trust)
    await _publish_status(js, fleet, "big", 4096)
    await _publish_status(js, fleet, "small", 128)
    await _publish_status(js, fleet, "tiny", 32)

    assert (await registry.assign(fleet, 4, model=name, node="big")).variant == "fp32"
    assert (await registry.assign(fleet, 4, model=name, node="small")).variant == "int8"
    # Nothing fits: the smallest goes out, and the node will refuse it as too large, visibly.
    assert (await registry.assign(fleet, 4, model=name, node="tiny")).variant == "int8"
    # Never reported: the node chooses from the variants itself.
    unknown = await registry.assign(fleet, 4, model=name, node="quiet")
    assert unknown.variant is None
    assert unknown.variants == ["fp32", "int8"]
    forced = await registry.assign(fleet, 4, model=name, node="big", variant="int8")
    assert forced.variant == "int8"
    fleet_wide = await registry.assign(fleet, 4, model=name)
    assert fleet_wide.node is None
    assert fleet_wide.variant is None

    assert (await _assignment(js, fleet, "small")).variant == "int8"
    assert (await _assignment(js, fleet, "big")).variant == "int8"
    stored = await _assignment(js, fleet, None)
    assert (stored.model, stored.version, stored.fleet) == (name, 4, fleet)


async def test_assign_refuses_what_the_registry_does_not_hold(
    js: JetStreamContext, key: Ed25519PrivateKey, tmp_path: Path, fleet: str
) -> None:
    name = _model_name()
    registry = Registry(js)
    await registry.push(
        make_bundle(tmp_path / "b", key, version=1, name=name), TrustStore([key.public_key()])
    )
    with pytest.raises(RegistryError, match="version 2 is not in the registry"):
        await registry.assign(fleet, 2, model=name)
    with pytest.raises(RegistryError, match="no variant 'int8'"):
        await registry.assign(fleet, 1, model=name, variant="int8")
    with pytest.raises(ValueError, match="node"):
        await registry.assign(fleet, 1, model=name, node="_fleet")


# -- the CLI ----------------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--log-level", "error", *args])
    return result.exit_code, result.output


async def _manifest_keys(url: str) -> list[str]:
    """Not kv.keys(): its replay can end before the entries it received (shared/kv.py)."""
    nc = await nats.connect(url)
    try:
        return await kv_keys(nc.jetstream(), names.MODELS_MANIFEST_BUCKET)
    finally:
        await nc.close()


@pytest.mark.parametrize("case", sorted(set(BAD_BUNDLES) - {"too_large"}))
def test_cli_push_refuses_a_bad_bundle_with_the_reason(
    case: str, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """too_large is not a push-time property: it depends on the device."""
    priv, pub = new_keypair(tmp_path / "keys")
    key = load_private_key(priv)
    out = tmp_path / "bad"
    code = BAD_BUNDLES[case](out, key, 1, _model_name())  # a name of its own: the registry is shared
    doc = json.loads((out / "manifest.json").read_text())
    before = anyio.run(_manifest_keys, nats_server.url)
    exit_code, output = _cli("models", "push", str(out), "--nats", nats_server.url, "--trust", str(pub))
    assert exit_code == 1, output
    assert f"bundle refused [{code}]" in output
    after = anyio.run(_manifest_keys, nats_server.url)
    assert after == before
    assert names.manifest_key(doc["name"], doc["version"], doc["variant"]) not in after


def test_cli_build_push_list_assign(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    exit_code, output = _cli("keys", "new", "--out", str(tmp_path / "keys"), "--name", "fleet")
    assert exit_code == 0, output
    name = _model_name()
    bundle = tmp_path / "b"
    key, pub = str(tmp_path / "keys" / "fleet.key"), str(tmp_path / "keys" / "fleet.pub")
    exit_code, output = _cli(
        "models",
        "build",
        "--arch",
        "ngram",
        "--out",
        str(bundle),
        "--key",
        key,
        "--name",
        name,
        "--version",
        "5",
    )
    assert exit_code == 0, output
    assert "held-out" in output
    exit_code, output = _cli("models", "quantize", str(bundle), "--out", str(tmp_path / "q"), "--key", key)
    assert exit_code == 0, output
    assert "top-1" in output
    assert "ratio" in output
    for path in (bundle, tmp_path / "q"):
        exit_code, output = _cli("models", "push", str(path), "--nats", nats_server.url, "--trust", pub)
        assert exit_code == 0, output
    exit_code, output = _cli("models", "list", "--nats", nats_server.url, "--json")
    assert exit_code == 0, output
    rows = [r for r in json.loads(output) if r["name"] == name]
    assert [(r["version"], r["variant"]) for r in rows] == [(5, "fp32"), (5, "int8")]
    assert rows[1]["parent_version"] == 5
    exit_code, output = _cli(
        "models", "assign", "--nats", nats_server.url, "--fleet", "fcli", "--version", "5", "--model", name
    )
    assert exit_code == 0, output
    assert "whole fleet" in output
    exit_code, output = _cli(
        "models", "assign", "--nats", nats_server.url, "--fleet", "fcli", "--version", "9", "--model", name
    )
    assert exit_code == 1
    assert "not in the registry" in output


def test_cli_push_without_trust_keys_is_a_usage_error(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path / "b", key)
    exit_code, output = _cli("models", "push", str(bundle.path), "--nats", "nats://127.0.0.1:1")
    assert exit_code == 2
    assert "--trust" in output


def test_cli_sign_makes_an_edited_bundle_valid_again(tmp_path: Path) -> None:
    priv, pub = new_keypair(tmp_path / "keys")
    key = load_private_key(priv)
    BAD_BUNDLES["bad_signature"](tmp_path / "b", key, 1)
    exit_code, output = _cli("models", "sign", str(tmp_path / "b"), "--key", str(priv))
    assert exit_code == 0, output
    b = read_bundle(tmp_path / "b")
    TrustStore.from_files([pub]).verify(b.manifest)
    assert b.manifest.notes == "edited after signing"
    assert msgspec.json.decode((tmp_path / "b" / "manifest.json").read_bytes())["signature"] is not None


def test_cli_push_accepts_the_archive_form(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    priv, pub = new_keypair(tmp_path / "keys")
    name = _model_name()
    bundle = make_bundle(tmp_path / "b", load_private_key(priv), version=7, name=name)
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(pack_archive(bundle))
    exit_code, output = _cli("models", "push", str(archive), "--nats", nats_server.url, "--trust", str(pub))
    assert exit_code == 0, output
    assert f"{name}/7/fp32: stored" in output
    assert names.manifest_key(name, 7, "fp32") in anyio.run(_manifest_keys, nats_server.url)


@pytest.mark.parametrize(
    ("memory_mb", "expected"),
    [(0, "fp32"), (4096, "fp32"), (256, "fp32"), (255, "int8"), (64, "int8"), (10, "int8")],
)
def test_choose_variant_takes_the_biggest_that_fits_else_the_smallest(memory_mb: int, expected: str) -> None:
    """0 = memory unknown: everything is assumed to fit."""
    assert choose_variant({"int8": 64, "fp32": 256}, DeviceProfile(memory_mb=memory_mb)) == expected


def test_choose_variant_breaks_ties_by_preference_and_needs_a_choice() -> None:
    assert choose_variant({"int8": 64, "fp32": 64}, DeviceProfile(memory_mb=128)) == "fp32"
    assert choose_variant({"custom": 64, "int8": 64}, DeviceProfile()) == "int8"
    with pytest.raises(ValueError, match="no variants"):
        choose_variant({}, DeviceProfile())


def test_cli_push_names_the_bundle_not_its_first_file(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    """A multi-file bundle's own identity is its signed manifest's sha256 (the registry's
    ``files/<sha256>`` object of the manifest) and its size is every file's; the manifest's
    ``sha256``/``size_bytes`` fields describe only the encoder."""
    priv, pub = new_keypair(tmp_path / "keys")
    name = _model_name()
    b = make_transformer_bundle(tmp_path / "b", load_private_key(priv), name=name)
    exit_code, output = _cli("models", "push", str(b.path), "--nats", nats_server.url, "--trust", str(pub))
    assert exit_code == 0, output
    bundle_sha = hashlib.sha256((b.path / "manifest.json").read_bytes()).hexdigest()
    total = sum(f.size_bytes for f in b.files)
    assert b.manifest.sha256 not in output
    assert f"{name}/1/fp32: stored (3 files, {total} bytes, bundle sha256 {bundle_sha})" in output
