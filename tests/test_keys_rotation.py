"""Signing keys rotated and revoked on a real server with a real node (issue 17).

- Migration + rotation: a node configured with `--trust A.pub` and `--trust-root root.pub`
  follows the root-signed list published with `slmops keys rotate`; a version signed by the new
  key B installs even when assigned right after the list changed (never refused), A is
  retired, the registry then refuses A's bundles, and the accepted list survives a restart
  without the server.
- Compromise: the node falls back to the cached version whose signer is still trusted and
  reports it; with none left the model answers 503 with the reason, also after a restart,
  while the cache keeps the files.
- Hostile lists in KV (another root, an older version replayed) are refused and reported; the
  node keeps the list it holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import anyio
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _edge_util import Keys, Statuses, edge_config
from _models import make_bundle
from _nats import jetstream, new_fleet, wait_until
from slmops.cli import main
from slmops.cloud.keys import change_key_list, read_key_list
from slmops.cloud.registry import Registry
from slmops.edge.api import serve_api
from slmops.edge.errors import NoModel
from slmops.edge.node import EdgeNode
from slmops.shared import names
from slmops.shared.bundle import TrustStore, key_id, load_private_key, new_keypair
from slmops.shared.errors import BundleError
from slmops.shared.keylist import KEYLIST_KEY, revise, sign
from slmops.shared.messages import ModelRef, NodeStatus, decode_json
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio


async def slmops(*args: str) -> str:
    """Run an `slmops` command in this process (the command's work, not a process's start-up, is
    under test: ~2-5 s of Python start-up and imports each, five per rotation); its stdout, or
    an AssertionError with its output."""
    out = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["--log-level", "error", *args]))
    assert out.exit_code == 0, out.stderr + out.stdout + repr(out.exception)
    return out.stdout


def serving(node: EdgeNode) -> ModelRef | None:
    current = node.models.current
    return None if current is None else current.ref


async def record_statuses(js: JetStreamContext, fleet: str, found: Statuses, tg: anyio.abc.TaskGroup) -> None:
    nc = js._nc  # the test's own client: subscribe to the fleet's status subject
    sub = await nc.subscribe(f"slmops.status.{fleet}.>")

    async def pump() -> None:
        async for msg in sub.messages:
            found.items.append(decode_json(msg.data, NodeStatus))

    tg.start_soon(pump)


async def test_rotation_from_a_trust_file_to_the_key_list_refuses_no_legitimate_bundle(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    fleet, model = new_fleet(), "rotclf"
    a, b = Keys(tmp_path / "a"), Keys(tmp_path / "b")
    await slmops("keys", "init-root", "--out", str(tmp_path / "root"))
    root_key, root_pub = tmp_path / "root" / "root.key", tmp_path / "root" / "root.pub"
    url = private_server.url
    v1 = make_bundle(tmp_path / "v1", a.key, version=1, name=model)
    v2 = make_bundle(tmp_path / "v2", b.key, version=2, name=model)
    v3 = make_bundle(tmp_path / "v3", a.key, version=3, name=model)
    found = Statuses()
    async with jetstream(url) as js, anyio.create_task_group() as tg:
        await record_statuses(js, fleet, found, tg)
        registry = Registry(js)
        await registry.push(v1, TrustStore([a.key.public_key()]))
        await registry.assign(fleet, 1, model=model)
        # Deployed before the key list existed: trusts A's file, and is given the root once.
        cfg = edge_config(tmp_path, a, fleet=fleet, url=url, trust_root=[str(root_pub)])
        async with EdgeNode(cfg) as node:
            await wait_until(lambda: serving(node) == ModelRef(name=model, version=1), 30, what="v1 serving")
            # Step 1: the list names A (what the nodes trust today) and the new key B.
            out = await slmops("keys", "rotate", "--nats", url, "--root", str(root_key), "--add", str(a.pub),
                               "--add", str(b.pub))  # fmt: skip
            assert "key list version 1 published" in out
            # Step 2: B signs the next version, pushed (the list vouches for B) and assigned at
            # once: the node may not have read the list yet, and must still install it.
            await slmops("models", "push", str(v2.path), "--nats", url, "--trust-root", str(root_pub))
            await registry.assign(fleet, 2, model=model)
            await wait_until(lambda: serving(node) == ModelRef(name=model, version=2), 30, what="v2 serving")
            assert node.keys.version == 1
            # Step 3: retire A. What runs (v2, by B) keeps running; A's new bundles are refused.
            await slmops("keys", "rotate", "--nats", url, "--root", str(root_key), "--retire", str(a.pub))
            await wait_until(lambda: node.keys.version == 2, 30, what="list v2 accepted")
            assert serving(node) == ModelRef(name=model, version=2)
            with pytest.raises(BundleError, match="marks retired") as refused:
                await registry.push(v3, TrustStore([a.key.public_key()]))
            assert refused.value.code == "revoked_key"
            listing = await slmops("keys", "list", "--nats", url, "--trust-root", str(root_pub))
            assert re.search(rf"{key_id(a.key.public_key())}\s+retired", listing), listing
            assert "verified" in listing
            await wait_until(lambda: any(s.key_list_version == 2 for s in found.items), 30, what="status v2")
        assert [s.refresh for s in found.items if s.event == "model_rejected"] == []
        tg.cancel_scope.cancel()
    # The accepted list survives a restart, even with the server gone.
    private_server.stop()
    async with EdgeNode(cfg) as node:
        assert node.keys.version == 2
        assert serving(node) == ModelRef(name=model, version=2)
        assert node.models.trust.status_of(key_id(a.key.public_key())) == "retired"


async def test_a_compromised_signer_falls_back_then_answers_503_with_the_reason(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    fleet, model = new_fleet(), "cmpclf"
    root = Ed25519PrivateKey.generate()
    root_pub = tmp_path / "root.pub"
    Keys(tmp_path / "r")  # only for its PEM writing below
    from cryptography.hazmat.primitives import serialization

    root_pub.write_bytes(
        root.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    a, b = Keys(tmp_path / "a"), Keys(tmp_path / "b")
    v1 = make_bundle(tmp_path / "v1", a.key, version=1, name=model)
    v2 = make_bundle(tmp_path / "v2", b.key, version=2, name=model)
    found = Statuses()
    url = private_server.url
    async with jetstream(url) as js, anyio.create_task_group() as tg:
        await record_statuses(js, fleet, found, tg)
        await change_key_list(js, root, add=[a.key.public_key(), b.key.public_key()])
        registry = Registry(js)
        for bundle in (v1, v2):
            await registry.push(bundle, TrustStore(), roots=[root.public_key()])
        # A node that trusts only the root: every signing key comes from the list.
        cfg = edge_config(tmp_path, a, fleet=fleet, url=url, trust=[], trust_root=[str(root_pub)],
                          http="127.0.0.1:0")  # fmt: skip
        async with EdgeNode(cfg) as node, serve_api(node) as api, aiohttp.ClientSession() as http:
            await wait_until(lambda: node.keys.version == 1, 30, what="list v1 accepted")
            for version in (1, 2):
                await registry.assign(fleet, version, model=model)
                await wait_until(lambda v=version: serving(node) == ModelRef(name=model, version=v), 30)
            assert node.models.previous == ModelRef(name=model, version=1)
            # B leaks: v2 is no longer served; v1 (by A, still trusted) takes over, reported.
            await change_key_list(js, root, status={key_id(b.key.public_key()): "compromised"})
            await wait_until(lambda: serving(node) == ModelRef(name=model, version=1), 30, what="fallback")

            def fallback_reported() -> bool:
                notes = [s.last_error or "" for s in found.of("n1", "keys_fallback")]
                return any("compromised" in n and "fell back to v1" in n for n in notes)

            await wait_until(fallback_reported, 30, what="fallback reported with its reason")
            # A leaks too: nothing trusted is left; the model answers 503 saying why.
            await change_key_list(js, root, status={key_id(a.key.public_key()): "compromised"})
            await wait_until(lambda: serving(node) is None, 30, what="model not served")
            async with http.post(
                f"http://127.0.0.1:{api.port}/v1/predict", json={"texts": ["alpha"]}
            ) as resp:
                body = await resp.json()
                assert resp.status == 503, body
            assert "compromised" in str(body), body
            assert "no version with a trusted signer" in str(body), body
            await wait_until(
                lambda: any("503" in (s.last_error or "") for s in found.items), 30, what="report"
            )
        tg.cancel_scope.cancel()
    cached = sorted(p.name for p in (tmp_path / "data-n1" / "models").iterdir() if p.is_dir())
    assert cached == [f"{model}__1__fp32", f"{model}__2__fp32"]  # the cache keeps the files
    private_server.stop()
    async with EdgeNode(cfg) as node:
        assert serving(node) is None
        with pytest.raises(NoModel, match="compromised"):
            await node.predict(["alpha"])


async def test_hostile_lists_in_kv_are_refused_reported_and_the_held_list_kept(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    fleet = new_fleet()
    root, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    a = Keys(tmp_path / "a")
    root_pub = tmp_path / "root.pub"
    from cryptography.hazmat.primitives import serialization

    root_pub.write_bytes(
        root.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    found = Statuses()
    url = private_server.url
    async with jetstream(url) as js, anyio.create_task_group() as tg:
        await record_statuses(js, fleet, found, tg)
        first = await change_key_list(js, root, add=[a.key.public_key()])
        v1_raw, _ = await read_key_list(js)
        await change_key_list(js, root, add=[Ed25519PrivateKey.generate().public_key()])
        cfg = edge_config(tmp_path, a, fleet=fleet, url=url, trust_root=[str(root_pub)])
        kv = await js.key_value(names.KEYS_BUCKET)
        async with EdgeNode(cfg) as node:
            await wait_until(lambda: node.keys.version == 2, 30, what="list v2 accepted")
            held = node.keys.keylist
            for hostile, reason in (
                (v1_raw, "older than or as old as"),  # a replay of version 1
                (sign(revise(held, status={key_id(a.key.public_key()): "compromised"}), stranger),
                 "not a trusted root"),
                (b"{" * 5000, "not JSON"),
            ):  # fmt: skip
                assert hostile is not None
                await kv.put(KEYLIST_KEY, hostile)
                await node.keys.refresh_now()
                assert node.keys.last_refusal is not None
                assert reason in node.keys.last_refusal
                assert node.keys.keylist == held
                await wait_until(
                    lambda r=reason: any(r in (s.last_error or "") for s in found.of("n1", "keys_refused")),
                    30,
                    what=f"refusal reported: {reason}",
                )
        assert first.version == 1
        tg.cancel_scope.cancel()


async def test_fleet_configs_are_signed_by_the_keys_the_list_trusts_now(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    """The key list decides fleet-config signers as it decides bundle signers: a key added
    only by the list (a rotation) signs a config; a config signed by a key the list marks
    compromised is refused even though the node's ``--trust`` file names it; and a restart
    checks the saved config against the saved list."""
    from _fleetcfg import put_raw, signed

    fleet = new_fleet()
    root = Ed25519PrivateKey.generate()
    root_pub = tmp_path / "root.pub"
    from cryptography.hazmat.primitives import serialization

    root_pub.write_bytes(
        root.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    a, b = Keys(tmp_path / "a"), Ed25519PrivateKey.generate()  # a: the --trust file; b: list only
    found = Statuses()
    url = private_server.url
    async with jetstream(url) as js, anyio.create_task_group() as tg:
        await record_statuses(js, fleet, found, tg)
        await change_key_list(js, root, add=[a.key.public_key(), b.public_key()])
        cfg = edge_config(tmp_path, a, fleet=fleet, url=url, trust_root=[str(root_pub)])
        async with EdgeNode(cfg) as node:
            await wait_until(lambda: node.keys.version == 1, 30, what="list v1 accepted")
            await put_raw(js, fleet, signed(fleet, 1, {"status_interval": "7s"}, b))
            await wait_until(lambda: node.fleetcfg.seen[0] == 1, 30, what="v1 seen")
            assert node.fleetcfg.seen[1] in ("probation", "applied"), node.fleetcfg.seen
            assert node.status.interval == 7.0
            await wait_until(lambda: node.fleetcfg.seen == (1, "applied", None), 60, what="v1 good")
            # A leaks: the list marks it compromised; a config it signs is refused, saying why.
            await change_key_list(js, root, status={key_id(a.key.public_key()): "compromised"})
            await wait_until(lambda: node.keys.version == 2, 30, what="list v2 accepted")
            await put_raw(js, fleet, signed(fleet, 2, {"status_interval": "9s"}, a.key))
            await wait_until(lambda: "compromised" in (node.fleetcfg.seen[2] or ""), 30, what="v2 refused")
            assert node.status.interval == 7.0
            assert node.fleetcfg.status_fields()["config_version"] == 1
            await wait_until(
                lambda: any("compromised" in (s.config_reason or "") for s in found.items),
                30,
                what="refusal reported",
            )
        tg.cancel_scope.cancel()
    # A restart without the server: the saved config (by B) verifies against the saved list.
    private_server.stop()
    async with EdgeNode(cfg) as node:
        assert node.keys.version == 2
        assert node.status.interval == 7.0
        assert node.fleetcfg.status_fields()["config_version"] == 1


def test_rotate_with_the_wrong_root_names_the_held_lists_root_and_the_one_given(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    """In-process `keys rotate --root WRONG.key`: the held list is genuine, the key passed is
    not its root; the message says which is which (it read as if the held root were untrusted)."""
    right = Ed25519PrivateKey.generate()

    async def first() -> None:
        async with jetstream(private_server.url) as js:
            await change_key_list(js, right, add=[Ed25519PrivateKey.generate().public_key()])

    anyio.run(first)
    wrong_key, _ = new_keypair(tmp_path / "wrong", "root")
    _, signer = new_keypair(tmp_path / "signer", "signer")
    wrong = load_private_key(wrong_key)
    rotate = ["keys", "rotate", "--nats", private_server.url, "--root", str(wrong_key), "--add", str(signer)]
    result = CliRunner().invoke(main, rotate)
    assert result.exit_code != 0
    said = (
        f"the list held is signed by root {key_id(right.public_key())}; the root key given (--root) "
        f"is {key_id(wrong.public_key())}, not that root"
    )
    assert said in result.output, result.output
