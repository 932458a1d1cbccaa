"""Audit identity in the layout ``slmops fleet init`` makes (issue 17): operators in the
``OPERATOR`` account reach the cloud's change service through an import with ``share: true``,
so the server names them; the generated ``cloud.toml`` lists that account. Against a real
nats-server in operator mode (JWT), the cloud run from the generated config, the operator's
change made by the real CLI with its creds."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import msgspec
import nats
import nats.errors
import pytest
from _cloud_util import cloud_config
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from _edge_util import Keys
from _nats import operator_server
from slmops.cli import main
from slmops.cloud.audit import read_audit
from slmops.cloud.config import CloudConfig
from slmops.cloud.service import CloudService
from slmops.shared import names
from slmops.shared.audit import ChangeReply, ChangeRequest
from slmops.shared.bundle import load_private_key, load_public_key, new_keypair
from slmops.shared.config import load_config
from slmops.shared.keylist import encode_public, revise, sign
from slmops.shared.messages import decode_json, encode_json

pytestmark = pytest.mark.anyio


async def _cli(*args: str) -> tuple[int, str]:
    def invoke() -> tuple[int, str]:
        result = CliRunner().invoke(main, ["--log-level", "error", *args], catch_exceptions=False)
        return result.exit_code, result.output

    return await anyio.to_thread.run_sync(invoke)


async def _key_list(url: str, creds: Path) -> bytes | None:
    from slmops.cloud.keys import read_key_list

    nc = await nats.connect(url, user_credentials=str(creds))
    try:
        return (await read_key_list(nc.jetstream()))[0]
    finally:
        await nc.close()


async def test_an_operator_is_audited_by_the_identity_the_server_gives_and_a_forged_header_is_not(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    async with operator_server(tmp_path / "ids") as (server, ids):
        # The generated cloud config names the OPERATOR account (and the cloud's creds).
        generated = load_config(CloudConfig, None, ids.cloud_toml)
        assert ids.operator_account_public
        assert generated.audit_accounts == [ids.operator_account_public]
        assert generated.nats_creds == str(ids.cloud_creds.resolve())
        cfg = msgspec.structs.replace(
            cloud_config(server.url, tmp_path / "state", fleet),
            nats_creds=generated.nats_creds,
            audit_accounts=generated.audit_accounts,
        )
        alice = ids.enroll("operator", name="alice").creds
        tool = ids.enroll("cloud", name="tool").creds  # a user of the cloud's own account
        node = ids.enroll("node", fleet=fleet, node="n1").creds
        key = tmp_path / "fleet.key"
        key.write_bytes(
            keys.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        settings = tmp_path / "c.toml"
        settings.write_text("min_count = 50\n")
        async with CloudService(cfg) as svc:
            await svc.wait_active(30)
            # alice, with nothing but her creds, through the real CLI.
            code, out = await _cli(
                "fleet", "config", "apply", "--nats", server.url, "--creds", str(alice), "--fleet", fleet,
                "--key", str(key), str(settings),
            )  # fmt: skip
            assert code == 0, out
            assert "version 1 published" in out
            # ... and the key list (no fleet: the global change subject), her root key local.
            root_key, _ = new_keypair(tmp_path / "root", "root")
            _, signer = new_keypair(tmp_path / "signer", "signer")
            keys_cmd = ("keys", "rotate", "--nats", server.url, "--root", str(root_key))
            code, out = await _cli(*keys_cmd, "--creds", str(alice), "--add", str(signer))
            assert code == 0, out
            assert "key list version 1 published" in out
            assert "not audited" not in out
            # A list of another root, and a replay of the one held: refused (and recorded).
            other, _ = new_keypair(tmp_path / "other", "root")
            held = await _key_list(server.url, alice)
            assert held is not None
            foreign = sign(revise(None, add=[load_public_key(signer)]), load_private_key(other))
            refusals = {
                "not a trusted root": (foreign, load_private_key(other)),
                "is the one held": (held, load_private_key(root_key)),
            }
            nc = await nats.connect(server.url, user_credentials=str(alice))
            try:
                for reason, (doc, by) in refusals.items():
                    params = {"root": encode_public(by.public_key())}
                    request = ChangeRequest(
                        action="keys.rotate", fleet="", document=doc.decode(), params=params
                    )
                    msg = await nc.request(names.CHANGE_GLOBAL, encode_json(request), timeout=20)
                    reply = decode_json(msg.data, ChangeReply)
                    assert not reply.ok
                    assert reason in (reply.error or "")
            finally:
                await nc.close()
            forged_header = {
                "Nats-Request-Info": json.dumps(
                    {"acc": ids.operator_account_public, "user": "root", "name_tag": "operator-root"}
                )
            }
            # Inside the cloud's account, a header naming the OPERATOR account is not believed.
            nc = await nats.connect(server.url, user_credentials=str(tool))
            try:
                request = ChangeRequest(action="config.apply", fleet=fleet, document="{}")
                msg = await nc.request(
                    names.change_subject(fleet), encode_json(request), timeout=20, headers=forged_header
                )
                assert not decode_json(msg.data, ChangeReply).ok  # "{}" is no document: refused, recorded
            finally:
                await nc.close()
            # A node may not even publish on the change subject: the server refuses it.
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc).lower())

            nc = await nats.connect(
                server.url,
                user_credentials=str(node),
                inbox_prefix=names.inbox_prefix(fleet, "n1"),
                error_cb=on_error,
            )
            try:
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request(
                        names.change_subject(fleet), encode_json(request), timeout=1, headers=forged_header
                    )
            finally:
                await nc.close()
            assert any("permissions violation" in e for e in errors), errors
            # alice reads the audit with her creds (the read-only JetStream imports).
            code, out = await _cli("audit", "--nats", server.url, "--creds", str(alice), "--fleet", fleet)
            assert code == 0, out
        # No cloud: the key list is written directly (with the cloud's creds), not audited.
        code, no_cloud = await _cli(*keys_cmd, "--creds", str(ids.cloud_creds), "--retire", str(signer))
        assert code == 0, no_cloud
        assert "key list version 2 published" in no_cloud
        assert "not audited" in no_cloud
        nc = await nats.connect(server.url, user_credentials=str(ids.cloud_creds))
        try:
            every = await read_audit(nc.jetstream(), fleet)
        finally:
            await nc.close()
    records = [r for r in every if r.fleet == fleet]
    rotated, *refused = [r for r in every if r.fleet is None]
    assert [(r.who, r.action, r.ok) for r in refused] == [("operator-alice", "keys.rotate", False)] * 2
    assert (rotated.who, rotated.account, rotated.action, rotated.target) == (
        "operator-alice",
        ids.operator_account_public,
        "keys.rotate",
        "key list",
    )
    assert list(rotated.detail["keys"].values()) == ["active"]
    assert [(r.who, r.account, r.action, r.ok) for r in records] == [
        ("operator-alice", ids.operator_account_public, "config.apply", True),
        ("unauthenticated", None, "config.apply", False),
    ]
    assert "operator-alice" in out
