"""NATS identities (shared.identity) and the fleet directory (cloud.trust.fleetdir): the JWT
format, creds files, the rights of each role, and hostile input. The server-side checks are
in tests/test_trust_server.py."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from slmops.cloud.trust import FleetDir, FleetDirError, fleetdir, permissions_for
from slmops.shared import names
from slmops.shared.atomic import write_atomic
from slmops.shared.identity import (
    IdentityError,
    decode_jwt,
    encode_jwt,
    new_key,
    read_creds,
    write_creds,
)


def _claims_of(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def test_a_user_jwt_has_the_nats_header_claims_and_a_verifying_signature() -> None:
    """Header ``ed25519-nkey``, claims iss/sub/iat/jti/nats.type/version 2, signature by the
    issuer; decode verifies it."""
    account, user = new_key("account"), new_key("user")
    token = encode_jwt("user", user.public, "u1", {"pub": {"allow": ["a"]}}, account, issued_at=1_700_000_000)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"typ": "JWT", "alg": "ed25519-nkey"}
    body = _claims_of(token)
    assert body["iss"] == account.public
    assert body["sub"] == user.public
    assert body["iat"] == 1_700_000_000
    assert isinstance(body["jti"], str)
    assert len(body["jti"]) == 52  # base32 of a 32-byte SHA-512/256, unpadded
    assert body["nats"] == {"pub": {"allow": ["a"]}, "type": "user", "version": 2}
    claims = decode_jwt(token)
    assert (claims.subject, claims.issuer, claims.kind) == (user.public, account.public, "user")
    assert "=" not in token


def test_a_tampered_or_foreign_jwt_is_refused() -> None:
    account, user = new_key("account"), new_key("user")
    token = encode_jwt("user", user.public, "u1", {"pub": {"allow": ["own"]}}, account)
    head, body, sig = token.split(".")
    claims = _claims_of(token)
    claims["nats"] = {"pub": {"allow": [">"]}, "type": "user", "version": 2}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(IdentityError, match="does not verify"):
        decode_jwt(f"{head}.{forged}.{sig}")
    for bad in ("", "a.b", "x.y.z", f"{head}.{body}", "e30.e30.e30"):
        with pytest.raises(IdentityError):
            decode_jwt(bad)


def test_wrong_signer_or_subject_kinds_are_refused() -> None:
    operator, account, user = new_key("operator"), new_key("account"), new_key("user")
    with pytest.raises(IdentityError, match="signed by an account key"):
        encode_jwt("user", user.public, "u", {}, operator)
    with pytest.raises(IdentityError, match="subject must be a account"):
        encode_jwt("account", user.public, "a", {}, operator)
    encode_jwt("account", account.public, "a", {}, operator)


def test_creds_file_round_trips_is_private_and_checks_its_seed(tmp_path: Path) -> None:
    account, user, stranger = new_key("account"), new_key("user"), new_key("user")
    token = encode_jwt("user", user.public, "u", {}, account)
    path = tmp_path / "u.creds"
    write_creds(path, token, user)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_creds(path) == (token, user)
    text = path.read_text()
    assert text.startswith("-----BEGIN NATS USER JWT-----\n")
    path.write_text(text.replace(user.seed, stranger.seed))
    with pytest.raises(IdentityError, match="not the key of the JWT's user"):
        read_creds(path)
    path.write_text("hello")
    with pytest.raises(IdentityError, match="not a NATS creds file"):
        read_creds(path)
    with pytest.raises(IdentityError, match="cannot read"):
        read_creds(tmp_path / "missing.creds")


def test_node_rights_name_only_its_own_subjects_and_no_consumer_api() -> None:
    """A node may publish its telemetry/status and the read requests of its own keys, and
    subscribe to its inbox and wake-up subjects; no ``CONSUMER`` right, no wildcard over
    other nodes."""
    claims = permissions_for("node", fleet="shop", node="till-001")
    pub, sub = claims["pub"]["allow"], claims["sub"]["allow"]
    assert "slmops.telemetry.shop.till-001" in pub
    assert "slmops.status.shop.till-001" in pub
    assert not any("CONSUMER" in s or "$JS.FC" in s or s in (">", "slmops.>") for s in pub)
    assert not any("till-002" in s for s in pub + sub)
    assert sub[: 1 + 4] == ["_INBOX_shop.till-001.>", *names.assignment_subjects("shop", "till-001")]
    assert sub[5:] == [
        f"$KV.{names.FLEETCONFIG_BUCKET}.shop.till-001",
        f"$KV.{names.FLEETCONFIG_BUCKET}.shop._fleet",
    ]
    assert claims["subs"] > 0
    assert claims["payload"] == 1024 * 1024
    analyst = permissions_for("analyst")
    assert analyst["pub"] == {"deny": [">"]}


def test_node_rights_in_jwt_mode_equal_the_password_generator_block() -> None:
    """deploy/nats/make_node_users.py (passwords) and cloud/trust (JWT) grant the same set."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "make_node_users.py"
    spec = importlib.util.spec_from_file_location("make_node_users", path)
    assert spec is not None
    assert spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    block = gen.node_block("shop", "till-001", "pw")
    quoted = [
        line.strip().strip(",").strip('"') for line in block.splitlines() if line.strip().startswith('"')
    ]
    claims = permissions_for("node", fleet="shop", node="till-001")
    assert sorted(quoted) == sorted(claims["pub"]["allow"] + claims["sub"]["allow"])


def test_fleet_dir_init_enroll_revoke_files(tmp_path: Path) -> None:
    d = FleetDir.init(tmp_path / "fleet")
    assert stat.S_IMODE((tmp_path / "fleet" / "keys").stat().st_mode) == 0o700
    for seed in (tmp_path / "fleet" / "keys").iterdir():
        assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    operator = decode_jwt(d.operator_jwt_path.read_text())
    assert operator.nats["system_account"] == d.system_account_public
    account = decode_jwt(d.account_jwt())
    assert account.issuer in operator.nats["signing_keys"]
    assert account.nats["limits"]["consumer"] == 16384
    enrolled = d.enroll("node", fleet="shop", node="till-001")
    jwt, user = read_creds(enrolled.creds)
    claims = decode_jwt(jwt)
    assert claims.nats["issuer_account"] == d.account_public
    assert claims.issuer in account.nats["signing_keys"]
    assert claims.name == "node-shop-till-001"
    revoked = d.revoke(fleet="shop", node="till-001")
    assert [u.public for u in revoked] == [user.public]
    newer = decode_jwt(FleetDir(d.path).account_jwt())
    assert newer.nats["revocations"] == {user.public: revoked[0].revoked_at}
    assert newer.issued_at > account.issued_at
    assert newer.jti != account.jti
    assert newer.subject == account.subject
    assert d.account_jwt() in d.server_conf.read_text()


def test_operators_live_in_their_own_account_which_imports_the_change_service_shared(tmp_path: Path) -> None:
    """fleet init: OPERATOR imports the change service with share (the server then names the
    requester) and only reads of JetStream; an operator's revocation goes into OPERATOR's JWT."""
    d = FleetDir.init(tmp_path / "fleet")
    ops = decode_jwt(d.account_jwt("OPERATOR"))
    assert ops.subject == d.operator_account_public
    change = [i for i in ops.nats["imports"] if i["subject"] == "slmops.cloud.change.>"]
    assert change == [
        {"name": "change", "subject": "slmops.cloud.change.>", "account": d.account_public,
         "type": "service", "share": True}
    ]  # fmt: skip
    imported = {i["subject"] for i in ops.nats["imports"]}
    writes = ("$JS.API.STREAM.CREATE", "$JS.API.CONSUMER.CREATE", "$KV", "$O")
    assert not any(s.startswith(writes) for s in imported)
    exported = {e["subject"] for e in decode_jwt(d.account_jwt()).nats["exports"]}
    assert imported <= exported
    assert d.operator_account_public in d.server_conf.read_text()
    assert f'audit_accounts = ["{d.operator_account_public}"]' in d.cloud_toml.read_text()
    alice = d.enroll("operator", name="alice")
    claims = decode_jwt(read_creds(alice.creds)[0])
    assert claims.nats["issuer_account"] == d.operator_account_public
    assert claims.issuer in ops.nats["signing_keys"]
    before = decode_jwt(d.account_jwt())
    d.revoke(public=alice.record.public)
    assert set(decode_jwt(d.account_jwt("OPERATOR")).nats["revocations"]) == {alice.record.public}
    assert decode_jwt(d.account_jwt()).jti == before.jti  # SLMOPS's JWT untouched


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"role": "node", "fleet": "shop"}, "--fleet and --node"),
        ({"role": "node", "fleet": "shop", "node": "a.b"}, "node"),
        ({"role": "node", "fleet": "../etc", "node": "n"}, "fleet"),
        ({"role": "root"}, "role must be one of"),
        ({"role": "analyst", "node": "n"}, "--node is for role node"),
        ({"role": "analyst", "name": "a b"}, "name"),
    ],
)
def test_enroll_refuses_bad_input_with_a_clear_error(
    tmp_path: Path, kwargs: dict[str, str], match: str
) -> None:
    d = FleetDir.init(tmp_path / "fleet")
    role = kwargs.pop("role")
    with pytest.raises(ValueError, match=match):
        d.enroll(role, **kwargs)  # type: ignore[arg-type]


def test_init_never_overwrites_and_other_dirs_are_refused(tmp_path: Path) -> None:
    FleetDir.init(tmp_path / "fleet")
    with pytest.raises(FleetDirError, match="refusing to overwrite keys"):
        FleetDir.init(tmp_path / "fleet")
    with pytest.raises(FleetDirError, match="not a fleet directory"):
        FleetDir(tmp_path)
    d = FleetDir(tmp_path / "fleet")
    with pytest.raises(FleetDirError, match="never enrolled"):
        d.revoke(fleet="shop", node="ghost")


def test_a_world_readable_leftover_temp_file_never_makes_a_secret_readable(tmp_path: Path) -> None:
    """A crash leftover (or a file another user pre-created) at the old fixed temp name
    ``.NAME.tmp`` with mode 0644 must not pass its mode on to the creds file."""
    account, user = new_key("account"), new_key("user")
    token = encode_jwt("user", user.public, "u", {}, account)
    path = tmp_path / "u.creds"
    leftover = tmp_path / ".u.creds.tmp"
    leftover.write_text("old junk")
    leftover.chmod(0o644)
    write_creds(path, token, user)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert user.seed in path.read_text()
    assert read_creds(path) == (token, user)
    assert leftover.read_text() == "old junk"  # never opened: the secret did not go through it


def test_write_atomic_is_private_by_default_and_takes_a_mode(tmp_path: Path) -> None:
    write_atomic(tmp_path / "secret", b"s")
    write_atomic(tmp_path / "public", b"p", mode=0o644)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644
    assert (tmp_path / "public").read_bytes() == b"p"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public", "secret"]  # no temp left


def _fail_once(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device (simulated crash)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("failing", ["_write_index", "write_creds"])
def test_a_crash_during_enroll_never_leaves_a_credential_revoke_cannot_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    d = FleetDir.init(tmp_path / "fleet")
    _fail_once(monkeypatch, fleetdir, failing)
    out = tmp_path / "fleet" / "creds" / "nodes" / "shop" / "till-001.creds"
    with pytest.raises(OSError, match="simulated crash"):
        d.enroll("node", fleet="shop", node="till-001")
    reloaded = FleetDir(d.path)
    nodes = {u.public for u in reloaded.users() if u.role == "node"}
    # Either nothing was minted, or the index knows the key: never a creds file it does not.
    assert not out.exists() or read_creds(out)[1].public in nodes, "a credential the index does not know"
    if nodes:
        revoked = reloaded.revoke(fleet="shop", node="till-001")
        assert {u.public for u in revoked} == nodes
        assert set(decode_jwt(reloaded.account_jwt()).nats["revocations"]) == nodes


def test_a_crash_during_revoke_keeps_the_revocation_in_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = FleetDir.init(tmp_path / "fleet")
    a = d.enroll("node", fleet="shop", node="a").record
    b = d.enroll("node", fleet="shop", node="b").record
    d.revoke(fleet="shop", node="a")
    _fail_once(monkeypatch, FleetDir, "_write_account_jwt")
    with pytest.raises(OSError, match="simulated crash"):
        d.revoke(fleet="shop", node="b")
    reloaded = FleetDir(d.path)
    by_key = {u.public: u for u in reloaded.users()}
    assert by_key[a.public].revoked_at is not None
    assert by_key[b.public].revoked_at is not None, "the crash lost b's revocation"
    c = reloaded.enroll("node", fleet="shop", node="c").record
    reloaded.revoke(fleet="shop", node="c")  # the next revoke rebuilds the claims from the index
    revocations = decode_jwt(FleetDir(d.path).account_jwt()).nats["revocations"]
    assert set(revocations) == {a.public, b.public, c.public}


@pytest.mark.parametrize(
    ("role", "extra", "suggested"),
    [
        ("node", ["--fleet", "shop", "--node", "till-1"], "/etc/slmops/nats.creds"),
        ("analyst", ["--name", "alice"], "~/.config/slmops/analyst.creds"),
        ("operator", [], "~/.config/slmops/operator.creds"),
    ],
)
def test_enroll_suggests_a_place_for_the_creds_that_fits_the_role(
    tmp_path: Path, role: str, extra: list[str], suggested: str
) -> None:
    """New-user trial: an analyst was told to copy its creds to /etc/slmops/nats.creds, a
    device's path; a person's creds belong in their own config directory."""
    from click.testing import CliRunner

    from slmops.cli import main

    FleetDir.init(tmp_path / "fleet")
    result = CliRunner().invoke(
        main, ["fleet", "enroll", "--auth", str(tmp_path / "fleet"), "--role", role, *extra]
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("creds: "))
    assert suggested in line
    assert role == "node" or "/etc/" not in line


def test_enroll_twice_refuses_to_overwrite_the_creds_unless_forced(tmp_path: Path) -> None:
    """New-user trial: a second `fleet enroll` of the same node silently replaced its creds file
    with a new key while the old one stayed valid. Now refused, naming --force and the revoke."""
    from click.testing import CliRunner

    from slmops.cli import main

    d = FleetDir.init(tmp_path / "fleet")
    args = ["fleet", "enroll", "--auth", str(d.path), "--fleet", "shop", "--node", "till-001"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    creds = d.path / "creds" / "nodes" / "shop" / "till-001.creds"
    before = creds.read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0
    assert "--force" in again.output
    assert "stay valid until `slmops fleet revoke --fleet shop --node till-001`" in again.output
    assert creds.read_bytes() == before
    assert len([u for u in FleetDir(d.path).users() if u.node == "till-001"]) == 1  # no key minted
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert creds.read_bytes() != before
    FleetDir(d.path).revoke(fleet="shop", node="till-001")
    after_revoke = FleetDir(d.path).enroll("node", fleet="shop", node="till-001")  # dead creds: no --force
    assert after_revoke.creds == creds
