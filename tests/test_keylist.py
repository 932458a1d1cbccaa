"""The signed key list (issue 17): signing and verifying, newer-only acceptance, revocation in
the trust store; hostile lists (malformed, wrong signature, wrong root, older versions,
replays, tampered entries, random bytes) are refused with a ``KeyListError`` naming why and
never raise anything else."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from _models import make_bundle
from slmops.shared.bundle import TrustStore, key_id, read_bundle
from slmops.shared.errors import BundleError
from slmops.shared.keylist import (
    KeyList,
    KeyListError,
    KeyListHeld,
    accept,
    apply_to,
    decode_signed,
    load_saved,
    revise,
    save,
    sign,
    trust_store,
)

root = pytest.fixture(scope="module", name="root")(Ed25519PrivateKey.generate)


def listed(
    root: Ed25519PrivateKey, *keys: Ed25519PrivateKey, held: KeyList | None = None
) -> tuple[KeyList, bytes]:
    new = revise(held, add=[k.public_key() for k in keys])
    raw = sign(new, root)
    return decode_signed(raw, [root.public_key()]), raw


def test_a_signed_list_verifies_and_names_its_keys(root: Ed25519PrivateKey) -> None:
    a = Ed25519PrivateKey.generate()
    keylist, raw = listed(root, a)
    assert keylist.version == 1
    assert keylist.root == key_id(root.public_key())
    assert keylist.status(key_id(a.public_key())) == "active"
    assert decode_signed(raw, [root.public_key()]) == keylist


def test_only_a_newer_version_is_accepted(root: Ed25519PrivateKey) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    v1, raw1 = listed(root, a)
    v2, raw2 = listed(root, b, held=v1)
    assert accept(v1, raw2, [root.public_key()]).version == 2
    with pytest.raises(KeyListError, match="version 1 is older than or as old as the one held") as replay:
        accept(v2, raw1, [root.public_key()])  # a replay of the old list
    assert not isinstance(replay.value, KeyListHeld)  # refused and reported, not taken as a re-read
    with pytest.raises(KeyListHeld, match="version 2 is the one held"):
        accept(v2, raw2, [root.public_key()])
    # Another list with the same version number (signed by the root, e.g. two operators):
    other = sign(revise(v1, add=[Ed25519PrivateKey.generate().public_key()]), root)
    with pytest.raises(KeyListError, match="older than or as old"):
        accept(v2, other, [root.public_key()])


def tampered(raw: bytes, change: dict[str, object]) -> bytes:
    doc = json.loads(raw)
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("not_json", "not JSON"),
        ("array", "not a JSON object"),
        ("deep", "not JSON"),
        ("huge_version", "malformed|root signature does not match"),
        ("version_string", "malformed"),
        ("status_unknown", "malformed"),
        ("no_keys", "malformed"),
        ("unsigned", "root signature does not match"),
        ("signature_not_base64", "root signature does not match"),
        ("status_flipped", "root signature does not match"),
        ("version_bumped", "root signature does not match"),
        ("other_root", "not a trusted root"),
        ("root_renamed", "not a trusted root"),
        ("too_big", "byte limit"),
        ("key_id_mismatch", "does not match its public key"),
        ("duplicate_key", "listed twice"),
        ("bad_public_key", "not 32 base64 bytes"),
        ("version_zero", "version must be >= 1"),
    ],
)
def test_hostile_lists_are_refused_naming_why(root: Ed25519PrivateKey, case: str, expected: str) -> None:
    a = Ed25519PrivateKey.generate()
    keylist, raw = listed(root, a)
    kid = key_id(a.public_key())
    entry = json.loads(raw)["keys"][0]
    other = Ed25519PrivateKey.generate()

    def resigned(change: dict[str, object]) -> bytes:
        # A list signed by the right root whose content breaks a rule the signature cannot.
        doc = {**json.loads(raw), **change}
        doc.pop("signature")
        body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        doc["signature"] = base64.b64encode(root.sign(body)).decode()
        return json.dumps(doc).encode()

    bad: bytes = {
        "not_json": lambda: b"\xff{not json",
        "array": lambda: b"[1, 2]",
        "deep": lambda: b"[" * 100_000 + b"]" * 100_000,
        "huge_version": lambda: tampered(raw, {"version": 10**400}),
        "version_string": lambda: tampered(raw, {"version": "7"}),
        "status_unknown": lambda: tampered(raw, {"keys": [{**entry, "status": "trusted-forever"}]}),
        "no_keys": lambda: json.dumps({k: v for k, v in json.loads(raw).items() if k != "keys"}).encode(),
        "unsigned": lambda: tampered(raw, {"signature": ""}),
        "signature_not_base64": lambda: tampered(raw, {"signature": "%%%"}),
        "status_flipped": lambda: tampered(raw, {"keys": [{**entry, "status": "compromised"}]}),
        "version_bumped": lambda: tampered(raw, {"version": 99}),
        "other_root": lambda: sign(keylist, other),
        "root_renamed": lambda: tampered(raw, {"root": "0" * 16}),
        "too_big": lambda: tampered(raw, {"pad": "x" * (2 << 20)}),
        "key_id_mismatch": lambda: resigned({"keys": [{**entry, "key_id": "f" * 16}]}),
        "duplicate_key": lambda: resigned({"keys": [entry, entry]}),
        "bad_public_key": lambda: resigned({"keys": [{**entry, "public_key": "AAAA"}]}),
        "version_zero": lambda: resigned({"version": 0}),
    }[case]()
    with pytest.raises(KeyListError, match=expected):
        decode_signed(bad, [root.public_key()])
    assert kid  # the untampered list named the key


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
).map(lambda v: json.dumps(v).encode()))  # fmt: skip
def test_random_bytes_only_ever_raise_key_list_error(data: bytes) -> None:
    root = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    with pytest.raises(KeyListError):
        decode_signed(data, [root.public_key()])


def test_revise_keeps_compromised_keys_compromised(root: Ed25519PrivateKey) -> None:
    a = Ed25519PrivateKey.generate()
    kid = key_id(a.public_key())
    v1, _ = listed(root, a)
    v2 = revise(v1, status={kid: "compromised"})
    with pytest.raises(ValueError, match="cannot become active again"):
        revise(v2, status={kid: "active"})
    with pytest.raises(ValueError, match="not in the key list"):
        revise(v2, status={"0123456789abcdef": "retired"})


def test_a_key_past_its_validity_counts_as_retired(root: Ed25519PrivateKey) -> None:
    a = Ed25519PrivateKey.generate()
    kid = key_id(a.public_key())
    keylist, _ = listed(root, a)
    ends = datetime.now(UTC) + timedelta(days=1)
    entry = keylist.keys[0].__class__(key_id=kid, public_key=keylist.keys[0].public_key, not_after=ends)
    limited = KeyList(version=2, issued=datetime.now(UTC), root="", keys=[entry])
    assert limited.status(kid) == "active"
    assert limited.status(kid, now=ends + timedelta(seconds=1)) == "retired"


def test_trust_store_retired_refuses_installs_but_serves_compromised_refuses_both(
    root: Ed25519PrivateKey, tmp_path: Path
) -> None:
    a = Ed25519PrivateKey.generate()
    kid = key_id(a.public_key())
    bundle = read_bundle(make_bundle(tmp_path / "b", a).path)
    v1, _ = listed(root, a)
    trust_store([], v1).verify(bundle)  # active: accepted
    retired = trust_store([a.public_key()], revise(v1, status={kid: "retired"}))
    with pytest.raises(BundleError, match="marks retired") as info:
        retired.verify(bundle)
    assert info.value.code == "revoked_key"
    retired.serving().verify(bundle)  # what runs keeps running
    # The list wins over a --trust file naming the same key (migration).
    compromised = trust_store([a.public_key()], revise(v1, status={kid: "compromised"}))
    for store in (compromised, compromised.serving()):
        with pytest.raises(BundleError, match="marks compromised"):
            store.verify(bundle)
    assert compromised.status_of(kid) == "compromised"


def test_an_unverified_list_only_ever_restricts(root: Ed25519PrivateKey) -> None:
    """Without the root (``models push`` given --trust only) the list's revocations apply, but
    its keys are not trusted."""
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    v1, _ = listed(root, a, b)
    raw = sign(revise(v1, status={key_id(a.public_key()): "retired"}), root)
    amended = apply_to(TrustStore([a.public_key()]), raw, [])
    assert amended.status_of(key_id(a.public_key())) == "retired"
    assert amended.status_of(key_id(b.public_key())) == "unknown"
    trusted = apply_to(TrustStore(), raw, [root.public_key()])
    assert trusted.status_of(key_id(b.public_key())) == "trusted"
    with pytest.raises(KeyListError, match="not a trusted root"):
        apply_to(TrustStore(), raw, [Ed25519PrivateKey.generate().public_key()])


def test_the_saved_list_is_verified_again_when_loaded(root: Ed25519PrivateKey, tmp_path: Path) -> None:
    a = Ed25519PrivateKey.generate()
    _, raw = listed(root, a)
    path = tmp_path / "keylist.json"
    assert load_saved(path, [root.public_key()]) is None
    save(path, raw)
    loaded = load_saved(path, [root.public_key()])
    assert loaded is not None
    assert loaded[1] == raw
    path.write_bytes(tampered(raw, {"version": 5}))
    with pytest.raises(KeyListError, match="signature does not match"):
        load_saved(path, [root.public_key()])
