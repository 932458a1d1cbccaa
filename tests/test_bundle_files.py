"""Multi-file bundles and signatures that survive schema growth (issue 11), and the archive
checked signature-first and streamed capped at the signed sizes (issue 13, fault 8)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from _transformer import make_transformer_bundle
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from _models import make_bundle
from slmops.cloud.registry import verify_bundle as registry_verify
from slmops.shared.bundle import (
    MANIFEST_FILE,
    TrustStore,
    check_files,
    pack_archive,
    read_bundle,
    resign_bundle,
    sign_manifest_bytes,
    unpack_archive,
)
from slmops.shared.capabilities import LEGACY_CAPABILITIES, requirements_of, unmet
from slmops.shared.errors import BundleError
from slmops.shared.runtime import verify_bundle

FIXTURES = Path(__file__).parent / "fixtures"
OLD = FIXTURES / "old_bundle_06cfd20"


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trust(key: Ed25519PrivateKey) -> TrustStore:
    return TrustStore([key.public_key()])


@pytest.fixture
def tf_bundle(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    return make_transformer_bundle(tmp_path / "tf", key).path


# -- signatures over the raw manifest ----------------------------------------------------------


def test_a_field_this_build_does_not_know_is_signed_and_verifies(
    tf_bundle: Path, key: Ed25519PrivateKey
) -> None:
    doc = json.loads((tf_bundle / MANIFEST_FILE).read_bytes())
    doc["from_the_future"] = {"generator": {"max_new_tokens": 64, "temperature": 0.7}, "n": [0, 1.5]}
    (tf_bundle / MANIFEST_FILE).write_bytes(sign_manifest_bytes(json.dumps(doc).encode(), key))
    b = read_bundle(tf_bundle)
    assert b"from_the_future" in b.raw
    verify_bundle(b, TrustStore([key.public_key()]))
    # ... and it is covered by the signature: editing only the unknown field breaks it.
    doc = json.loads(b.raw)
    doc["from_the_future"]["generator"]["temperature"] = 2.0
    (tf_bundle / MANIFEST_FILE).write_bytes(json.dumps(doc).encode())
    with pytest.raises(BundleError) as info:
        verify_bundle(read_bundle(tf_bundle), TrustStore([key.public_key()]))
    assert info.value.code == "bad_signature"


def test_a_bundle_signed_by_the_old_build_verifies_on_this_one(tmp_path: Path) -> None:
    """tests/fixtures/old_bundle_06cfd20 was written by the code at commit 06cfd20 (its
    tests/_models.make_bundle, key bytes 0..31), which signed the decoded Struct."""
    trust = TrustStore.from_files([FIXTURES / "old_bundle_06cfd20.pub"])
    b = read_bundle(OLD)
    assert b.manifest.files == []
    assert b'"files"' not in b.raw
    session = verify_bundle(b, trust)
    assert session.predict(["some words about beta"])[0].label == "beta"
    # Its archive, packed the way 06cfd20 did (manifest then model), unpacks signature-first.
    archive = tmp_path / "old.tar"
    with tarfile.open(archive, "w") as tar:
        for name in (MANIFEST_FILE, "model.onnx"):
            tar.add(OLD / name, arcname=name)
    out = unpack_archive(archive, tmp_path / "out", trust)
    verify_bundle(out, trust)


def test_an_old_signature_does_not_cover_fields_added_since(tmp_path: Path) -> None:
    """The legacy form covers what the old build knew; a new field slipped into an old signed
    manifest (say, a second file) is not covered, so the bundle is refused."""
    shutil.copytree(OLD, tmp_path / "b")
    doc = json.loads((tmp_path / "b" / MANIFEST_FILE).read_bytes())
    doc["task"] = "embedding"
    (tmp_path / "b" / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError) as info:
        TrustStore.from_files([FIXTURES / "old_bundle_06cfd20.pub"]).verify(read_bundle(tmp_path / "b"))
    assert info.value.code == "bad_signature"


# -- multi-file directories --------------------------------------------------------------------


def test_multi_file_bundle_round_trips_and_verifies(
    tf_bundle: Path, trust: TrustStore, tmp_path: Path
) -> None:
    b = read_bundle(tf_bundle)
    assert {f.role: f.path for f in b.manifest.files} == {
        "model": "encoder.onnx",
        "head": "head.onnx",
        "tokenizer": "tokenizer.json",
    }
    assert b.manifest.requires is not None
    assert b.manifest.requires.multi_file
    check_files(b)
    registry_verify(b, trust)  # the registry's check is the edge's check
    archive = tmp_path / "tf.tar"
    archive.write_bytes(pack_archive(b))
    out = unpack_archive(archive, tmp_path / "out", trust)
    assert out.raw == b.raw
    assert pack_archive(out) == archive.read_bytes()  # deterministic bytes
    verify_bundle(out, trust)


def test_a_file_not_listed_refuses_the_bundle(tf_bundle: Path) -> None:
    (tf_bundle / "extra.bin").write_bytes(b"smuggled")
    with pytest.raises(BundleError, match=r"'extra\.bin' is in the bundle but not listed"):
        read_bundle(tf_bundle)


def test_a_listed_file_missing_refuses_the_bundle(tf_bundle: Path) -> None:
    (tf_bundle / "head.onnx").unlink()
    with pytest.raises(BundleError, match=r"listed file 'head\.onnx' is missing"):
        read_bundle(tf_bundle)


def test_a_changed_file_fails_its_hash(tf_bundle: Path, trust: TrustStore) -> None:
    data = bytearray((tf_bundle / "tokenizer.json").read_bytes())
    data[10] ^= 0x01
    (tf_bundle / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        verify_bundle(read_bundle(tf_bundle), trust)
    assert info.value.code == "hash_mismatch"
    assert "tokenizer.json" in info.value.reason


@pytest.mark.parametrize("path", ["../x.onnx", "/etc/passwd", "a//b", "./a", "manifest.json", "a\\b"])
def test_listed_paths_must_stay_inside_the_bundle(tf_bundle: Path, key: Ed25519PrivateKey, path: str) -> None:
    doc = json.loads((tf_bundle / MANIFEST_FILE).read_bytes())
    doc["files"][1]["path"] = path
    (tf_bundle / MANIFEST_FILE).write_bytes(sign_manifest_bytes(json.dumps(doc).encode(), key))
    with pytest.raises(BundleError) as info:
        read_bundle(tf_bundle)
    assert info.value.code == "invalid"


def test_resign_rehashes_every_listed_file(
    tf_bundle: Path, key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    head = tf_bundle / "head.onnx"
    head.write_bytes(head.read_bytes())  # same bytes; then a real edit of the tokenizer
    tok = json.loads((tf_bundle / "tokenizer.json").read_text())
    tok["truncation"] = None
    (tf_bundle / "tokenizer.json").write_text(json.dumps(tok))
    resign_bundle(tf_bundle, key)
    verify_bundle(read_bundle(tf_bundle), trust)


# -- the archive: signature first, each file capped at its signed size --------------------------


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(b: Path) -> list[tuple[str, bytes]]:
    bundle = read_bundle(b)
    return [(MANIFEST_FILE, bundle.raw)] + [(f.path, (b / f.path).read_bytes()) for f in bundle.files]


def test_archive_with_a_forged_manifest_is_refused_before_any_file_is_written(
    tf_bundle: Path, trust: TrustStore, tmp_path: Path
) -> None:
    members = _members(tf_bundle)
    doc = json.loads(members[0][1])
    doc["labels"] = ["x", "y", "z"]
    members[0] = (MANIFEST_FILE, json.dumps(doc).encode())
    archive = tmp_path / "forged.tar"
    archive.write_bytes(_tar(members))
    out = tmp_path / "out"
    with pytest.raises(BundleError) as info:
        unpack_archive(archive, out, trust)
    assert info.value.code == "bad_signature"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("extra", "'extra.bin' is not listed"),
        ("missing", r"listed files missing from the archive: \['head.onnx'\]"),
        ("twice", "holds 'head.onnx' twice"),
        ("manifest_last", "must start with manifest.json"),
        ("longer", "declares .* bytes, the manifest lists"),
    ],
)
def test_archive_member_list_must_match_the_manifest(
    tf_bundle: Path, trust: TrustStore, tmp_path: Path, change: str, match: str
) -> None:
    members = _members(tf_bundle)
    if change == "extra":
        members.append(("extra.bin", b"smuggled"))
    elif change == "missing":
        members = [m for m in members if m[0] != "head.onnx"]
    elif change == "twice":
        members.append(next(m for m in members if m[0] == "head.onnx"))
    elif change == "manifest_last":
        members = [*members[1:], members[0]]
    elif change == "longer":
        members = [(n, d + b"\0" * 100 if n == "head.onnx" else d) for n, d in members]
    archive = tmp_path / "bad.tar"
    archive.write_bytes(_tar(members))
    with pytest.raises(BundleError, match=match):
        unpack_archive(archive, tmp_path / "out", trust)


def _sparse_member(name: str, real_size: int) -> bytes:
    """An old-GNU sparse tar member: 512 stored bytes declaring a file of ``real_size``."""
    h = bytearray(512)
    h[0 : len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % 512
    h[136:148] = b"%011o\0" % 0
    h[156:157] = b"S"
    h[257:265] = b"ustar  \0"
    h[386:398] = b"%011o\0" % (real_size - 512)
    h[398:410] = b"%011o\0" % 512
    h[483:495] = b"%011o\0" % real_size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + b"x" * 512


def test_sparse_tar_declaring_a_1_gib_model_is_refused_from_its_header(
    tf_bundle: Path, trust: TrustStore, tmp_path: Path
) -> None:
    """Fault 8: the archive is not inflated before the checks."""
    members = _members(tf_bundle)
    info = tarfile.TarInfo(MANIFEST_FILE)
    raw = members[0][1]
    info.size = len(raw)
    head = info.tobuf() + raw + b"\0" * (-len(raw) % 512)
    archive = tmp_path / "sparse.tar"
    archive.write_bytes(head + _sparse_member("encoder.onnx", 1 << 30) + b"\0" * 1024)
    assert archive.stat().st_size < 1 << 20
    with tarfile.open(archive) as t:  # what a plain extract would write: 1 GiB
        assert t.getmember("encoder.onnx").size == 1 << 30
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match=r"'encoder\.onnx' is not a plain file"):
        unpack_archive(archive, out, trust)
    assert time.perf_counter() - t0 < 5
    assert not (out / "encoder.onnx").exists()


def test_archive_member_is_streamed_no_further_than_its_signed_size(
    tf_bundle: Path, trust: TrustStore, tmp_path: Path
) -> None:
    """A member whose header matches the signed size but whose bytes differ is caught by the
    hash computed while streaming, and nothing past the signed size is read into the file."""
    members = _members(tf_bundle)
    members = [(n, bytes(len(d)) if n == "encoder.onnx" else d) for n, d in members]
    archive = tmp_path / "swapped.tar"
    archive.write_bytes(_tar(members))
    with pytest.raises(BundleError) as info:
        unpack_archive(archive, tmp_path / "out", trust)
    assert info.value.code == "hash_mismatch"


# -- requirements ------------------------------------------------------------------------------


def test_requirements_name_what_an_old_runtime_lacks(
    tf_bundle: Path, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    new = read_bundle(tf_bundle).manifest
    assert unmet(requirements_of(new), LEGACY_CAPABILITIES) == [
        "preprocessing 'tokenizer'",
        "multi-file bundles",
        "runtime level 2 (has 1)",
    ]
    old = make_bundle(tmp_path / "ngram", key).manifest
    assert unmet(requirements_of(old), LEGACY_CAPABILITIES) == []
    assert unmet(requirements_of(old), []) == []  # a node reporting nothing is an old node


def test_a_bundle_this_runtime_cannot_run_is_refused_as_incompatible(
    tf_bundle: Path, trust: TrustStore
) -> None:
    with pytest.raises(BundleError, match="needs preprocessing 'tokenizer'") as info:
        verify_bundle(read_bundle(tf_bundle), trust, capabilities=LEGACY_CAPABILITIES)
    assert info.value.code == "incompatible"


def test_manifest_struct_encodes_back_to_the_signed_bytes(tf_bundle: Path, trust: TrustStore) -> None:
    """A manifest written by this build, decoded and re-encoded (the registry's KV copy),
    still verifies: signing normalises the Struct first."""
    b = read_bundle(tf_bundle)
    trust.verify(msgspec.json.encode(b.manifest))


def _as_06cfd20_verifies(raw: bytes, public: Any) -> bool:
    """What a node running 06cfd20 checks (its shared/bundle.py canonical_bytes and verify,
    with its own ModelManifest, copied in tests/fixtures/messages_06cfd20.py): the manifest
    decoded into that Struct (unknown fields dropped), signature set to None, re-encoded,
    decoded again and encoded with sorted keys."""
    from fixtures.messages_06cfd20 import ModelManifest as OldManifest

    decoder = msgspec.json.Decoder(OldManifest)
    manifest = decoder.decode(raw)
    if manifest.signature is None:
        return False
    unsigned = msgspec.json.encode(msgspec.structs.replace(manifest, signature=None))
    signed = msgspec.json.encode(decoder.decode(unsigned), order="sorted")
    try:
        public.verify(base64.b64decode(manifest.signature.value), signed)
    except InvalidSignature:
        return False
    return True


def test_an_n_gram_bundle_written_by_this_build_verifies_on_06cfd20_nodes(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """The reverse of the fixture test: an old node in the fleet can still run the n-gram
    bundles this build writes (recalibrations included). The emulation of the old check is
    itself checked against the fixture the old code wrote."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    old_pub = load_pem_public_key((FIXTURES / "old_bundle_06cfd20.pub").read_bytes())
    assert _as_06cfd20_verifies((OLD / MANIFEST_FILE).read_bytes(), old_pub)
    ngram = make_bundle(tmp_path / "ngram", key)
    assert _as_06cfd20_verifies(ngram.raw, key.public_key())
    verify_bundle(read_bundle(ngram.path), TrustStore([key.public_key()]))
    # A tokenizer bundle needs this build: signed over the raw document, refused by old nodes.
    tf = make_transformer_bundle(tmp_path / "tf", key)
    assert not _as_06cfd20_verifies(tf.raw, key.public_key())
