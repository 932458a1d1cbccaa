"""Bundle format: signature, hash, archive form, runtime checks, smoke tests."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from _models import make_bundle
from slmops.shared.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    TrustStore,
    check_hash,
    load_private_key,
    load_public_key,
    new_keypair,
    pack_archive,
    read_bundle,
    sign_manifest,
    unpack_archive,
)
from slmops.shared.errors import BundleError
from slmops.shared.runtime import load_session


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def bundle_dir(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    return make_bundle(tmp_path / "b", key).path


def test_written_bundle_verifies_after_reading_back(bundle_dir: Path, key: Ed25519PrivateKey) -> None:
    b = read_bundle(bundle_dir)
    check_hash(b)
    TrustStore([key.public_key()]).verify(b.manifest)


def test_edited_manifest_fails_signature(bundle_dir: Path, key: Ed25519PrivateKey) -> None:
    doc = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    doc["labels"][0] = "omega"
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError) as info:
        TrustStore([key.public_key()]).verify(read_bundle(bundle_dir).manifest)
    assert info.value.code == "bad_signature"


def test_unknown_key_is_named(bundle_dir: Path) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(BundleError, match="not trusted") as info:
        TrustStore([other.public_key()]).verify(read_bundle(bundle_dir).manifest)
    assert info.value.code == "unknown_key"


def test_resigning_with_a_trusted_key_after_edit_verifies(bundle_dir: Path, key: Ed25519PrivateKey) -> None:
    m = read_bundle(bundle_dir).manifest
    edited = sign_manifest(msgspec.structs.replace(m, notes="retrained"), key)
    TrustStore([key.public_key()]).verify(edited)


def test_changed_model_bytes_fail_the_hash(bundle_dir: Path) -> None:
    data = bytearray((bundle_dir / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (bundle_dir / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        check_hash(read_bundle(bundle_dir))
    assert info.value.code == "hash_mismatch"


def test_truncated_model_is_reported_as_truncated(bundle_dir: Path) -> None:
    data = (bundle_dir / MODEL_FILE).read_bytes()
    (bundle_dir / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as info:
        check_hash(read_bundle(bundle_dir))
    assert info.value.code == "truncated"


def test_archive_round_trip(bundle_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "b.tar"
    archive.write_bytes(pack_archive(read_bundle(bundle_dir)))
    out = unpack_archive(archive, tmp_path / "out")
    check_hash(out)
    assert out.manifest == read_bundle(bundle_dir).manifest


def test_truncated_archive_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "b.tar"
    data = pack_archive(read_bundle(bundle_dir))
    archive.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError):
        unpack_archive(archive, tmp_path / "out")


def test_archive_with_extra_member_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle_dir / MANIFEST_FILE, arcname=MANIFEST_FILE)
        tar.add(bundle_dir / MODEL_FILE, arcname=MODEL_FILE)
        tar.add(bundle_dir / MODEL_FILE, arcname="../escape.onnx")
    with pytest.raises(BundleError, match="not listed in the manifest"):
        unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escape.onnx").exists()


def test_garbage_model_fails_to_load(bundle_dir: Path) -> None:
    (bundle_dir / MODEL_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(BundleError) as info:
        load_session(bundle_dir / MODEL_FILE, read_bundle(bundle_dir).manifest)
    assert info.value.code == "load_failed"


def test_smoke_tests_pass_then_catch_a_changed_expectation(bundle_dir: Path) -> None:
    b = read_bundle(bundle_dir)
    load_session(b.model_path, b.manifest).smoke_test()
    wrong = msgspec.structs.replace(
        b.manifest,
        smoke_tests=[msgspec.structs.replace(b.manifest.smoke_tests[0], label=b.manifest.labels[1])],
    )
    with pytest.raises(BundleError) as info:
        load_session(b.model_path, wrong).smoke_test()
    assert info.value.code == "smoke_failed"


def test_label_count_mismatch_is_incompatible(bundle_dir: Path) -> None:
    b = read_bundle(bundle_dir)
    fewer = msgspec.structs.replace(b.manifest, labels=b.manifest.labels[:2])
    with pytest.raises(BundleError) as info:
        load_session(b.model_path, fewer)
    assert info.value.code == "incompatible"


def test_key_files_round_trip_and_refuse_overwrite(tmp_path: Path) -> None:
    priv, pub = new_keypair(tmp_path, "fleet")
    assert priv.stat().st_mode & 0o077 == 0
    k = load_private_key(priv)
    assert TrustStore([load_public_key(pub)]).key_ids == TrustStore([k.public_key()]).key_ids
    with pytest.raises(FileExistsError):
        new_keypair(tmp_path, "fleet")
    with pytest.raises(ValueError, match="cannot read public key"):
        load_public_key(priv)
