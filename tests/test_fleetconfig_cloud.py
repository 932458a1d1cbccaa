"""Fleet configuration through the cloud (issue 17): ``slmops fleet config`` apply / show /
history / rollback against a real cloud service, nats-server and edge nodes; staged rollouts
gated on "applied and healthy"; the audit stream records the identity the server
authenticated and never one the client wrote."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from _cloud_util import cloud_config
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from _edge_util import Keys
from _fleetcfg import WAIT, Env, signed
from _nats import wait_until
from slmops.cli import main
from slmops.cloud.audit import read_audit
from slmops.cloud.fleetconfig import ConfigStore
from slmops.cloud.rollout.cohort import cohort
from slmops.cloud.service import CloudService
from slmops.shared import names
from slmops.shared.audit import ChangeReply, ChangeRequest
from slmops.shared.messages import decode_json, encode_json
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio


def _key_file(keys: Keys) -> Path:
    path = keys.root / "fleet.key"
    if not path.exists():
        path.write_bytes(
            keys.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


async def _cli(*args: str) -> tuple[int, str]:
    def invoke() -> tuple[int, str]:
        result = CliRunner().invoke(main, ["--log-level", "error", *args], catch_exceptions=False)
        return result.exit_code, result.output

    return await anyio.to_thread.run_sync(invoke)


@asynccontextmanager
async def _cloud(url: str, state: Path, fleet: str, **config: Any) -> AsyncIterator[CloudService]:
    async with CloudService(msgspec.structs.replace(cloud_config(url, state, fleet), **config)) as svc:
        await svc.wait_active(30)
        yield svc


def _fleetcmd(env: Env, command: str, *args: str) -> list[str]:
    return ["fleet", "config", command, "--nats", env.url, "--fleet", env.fleet, *args]


async def _apply(env: Env, text: str, *args: str) -> tuple[int, str]:
    """``fleet config apply`` of a TOML file holding ``text``, signed with the test's key."""
    path = env.tmp / f"c{len(list(env.tmp.glob('c*.toml')))}.toml"
    path.write_text(text)
    return await _cli(*_fleetcmd(env, "apply", "--key", str(_key_file(env.keys)), *args, str(path)))


async def _forge_and_misuse(env: Env) -> None:
    """Requests a client fills in itself: an identity in the body and a forged server
    header (recorded as unauthenticated), a version not newer (refused, recorded), junk."""
    forged = {
        **json.loads(encode_json(ChangeRequest(action="config.apply", fleet=env.fleet))),
        "document": signed(env.fleet, 4, {"min_count": 5}, env.keys.key).decode(),
        "who": "admin",
    }
    claim = {"Nats-Request-Info": json.dumps({"acc": "OPS", "user": "mallory", "name_tag": "mallory"})}
    stale = {**forged, "document": signed(env.fleet, 2, {"min_count": 5}, env.keys.key).decode()}
    junk = [b"", b"[" * 50_000, b'{"action": 1}', b"\xff" * 1000, b'{"action":"config.apply","fleet":"../x"}']
    nc = await nats.connect(env.url)
    try:
        subject = names.change_subject(env.fleet)
        msg = await nc.request(subject, json.dumps(forged).encode(), timeout=20, headers=claim)
        assert decode_json(msg.data, ChangeReply).ok
        refused = decode_json(
            (await nc.request(subject, json.dumps(stale).encode(), timeout=20)).data, ChangeReply
        )
        assert not refused.ok
        assert "not newer" in (refused.error or "")
        for body in junk:
            assert not decode_json((await nc.request(subject, body, timeout=20)).data, ChangeReply).ok
    finally:
        await nc.close()


async def test_apply_show_history_rollback_and_audit_without_auth(env: Env) -> None:
    async with _cloud(env.url, env.tmp / "state", env.fleet), env.node() as node:
        # a file with a key that is not pushable: refused before anything is published
        code, out = await _apply(env, "min_count = 4\nturbo = true\n")
        assert code == 2, out
        assert "turbo" in out
        code, out = await _apply(
            env, 'min_count = 4\nstatus_interval = "6s"\n[safety]\nmax_error_rate = 0.1\n'
        )
        assert code == 0, out
        assert "version 1 published" in out
        await env.wait_state("n1", 1, "applied")
        assert node.buffer.k == 4
        code, out = await _cli(*_fleetcmd(env, "show", "--json"))
        assert code == 0, out
        shown = json.loads(out)
        assert shown["keys"]["_fleet"]["version"] == 1
        assert shown["nodes"]["n1"]["state"] == "applied"
        code, out = await _apply(env, "min_count = 8\n")
        assert code == 0, out
        await env.wait_state("n1", 2, "applied")
        assert node.buffer.k == 8
        code, out = await _cli(*_fleetcmd(env, "rollback", "--key", str(_key_file(env.keys)), "--to", "1"))
        assert code == 0, out
        assert "version 3 published" in out
        await env.wait_state("n1", 3, "applied")
        assert (node.buffer.k, node.status.interval) == (4, 6.0)
        code, out = await _cli(*_fleetcmd(env, "history", "--json"))
        assert code == 0, out
        docs = [json.loads(line) for line in out.splitlines()]
        assert [d["version"] for d in docs] == [1, 2, 3]
        assert docs[2]["note"] == "rollback to v1"
        assert docs[2]["settings"] == docs[0]["settings"]
        await _forge_and_misuse(env)
        records = [r for r in await read_audit(env.js, env.fleet) if r.fleet in (env.fleet, None)]
        assert [r.action for r in records if r.ok] == [
            "config.apply",
            "config.apply",
            "config.rollback",
            "config.apply",
        ]
        assert {r.who for r in records} == {"unauthenticated"}
        assert any(not r.ok and "not newer" in (r.reason or "") for r in records)
        code, out = await _cli("audit", "--nats", env.url, "--fleet", env.fleet)
        assert code == 0, out
        for seen in ("config.rollback", "unauthenticated"):
            assert seen in out
        for unseen in ("mallory", "admin"):
            assert unseen not in out


async def test_staged_config_rollout_waits_for_applied_and_healthy_and_halts_on_a_refusal(env: Env) -> None:
    nodes = ["n1", "n2", "n3"]
    canary = sorted(cohort(env.fleet, nodes, 30))
    assert len(canary) == 1
    others = [n for n in nodes if n not in canary]
    staged = ("--stages", "30,100")
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(_cloud(env.url, env.tmp / "state", env.fleet))
        running = {n: await stack.enter_async_context(env.node(n)) for n in nodes}
        store = await ConfigStore(env.js).open()
        await wait_until(lambda: _known(store, env.fleet, nodes), 20, what="all nodes reported")
        code, out = await _apply(env, "min_count = 3\n", *staged)
        assert code == 0, out
        assert f"nodes now: {canary[0]}" in out
        first = await env.wait_state(canary[0], 1, "applied")
        canary_at = env.statuses.items.index(first)
        # until the canary said "applied", nobody else had the version
        assert all(s.config_seen != 1 for s in env.statuses.items[:canary_at] if s.node in others)
        for n in others:
            await env.wait_state(n, 1, "applied")
        await wait_until(lambda: _rollout_status(store, env.fleet, "completed"), 20, what="rollout completed")
        assert "_fleet" in await store.current(env.fleet)
        assert all(running[n].buffer.k == 3 for n in nodes)
        # The canary's next version fails its probation (a URL nobody listens on): halted.
        code, out = await _apply(env, 'min_count = 6\nnats_url = "nats://127.0.0.1:9"\n', *staged)
        assert code == 0, out
        await wait_until(lambda: _rollout_status(store, env.fleet, "halted"), WAIT * 2, what="rollout halted")
        assert all(running[n].fleetcfg.saved.highest < 2 for n in others)
        records = await read_audit(env.js, env.fleet)
        actions = [r.action for r in records]
        assert "config.halted" in actions
        assert "config.completed" in actions
        halted = next(r for r in records if r.action == "config.halted")
        assert halted.who == "cloud"
        assert canary[0] in (halted.reason or "")


async def _known(store: ConfigStore, fleet: str, nodes: list[str]) -> bool:
    return set(await store.known_nodes(fleet)) >= set(nodes)


async def _rollout_status(store: ConfigStore, fleet: str, status: str) -> bool:
    entry = await store.kv.get(f"{fleet}._rollout")
    return bool(entry.value) and json.loads(entry.value)["status"] == status


_AUTH = """
accounts {
  CLOUD {
    jetstream: enabled
    users: [{user: cloud, password: cloudpw}]
    exports: [{service: "slmops.cloud.change.>"}]
  }
  OPS {
    users: [{user: alice, password: alicepw}]
    imports: [{service: {account: CLOUD, subject: "slmops.cloud.change.>"}, share: true}]
  }
}
"""


@pytest.mark.parametrize(
    ("accounts", "expected"), [(["OPS"], ("alice", "OPS")), ([], ("unauthenticated", "OPS"))]
)
async def test_audit_records_the_identity_the_server_authenticated(
    tmp_path: Path, keys: Keys, fleet: str, accounts: list[str], expected: tuple[str, str]
) -> None:
    """alice (account OPS, reaching the change service through its import with ``share: true``)
    is recorded as the server names her, a forged header replaced; with OPS not among the
    cloud's ``audit_accounts`` (the default: none) no header is believed — a client of the
    cloud's own account could have written it."""
    conf = tmp_path / "auth.conf"
    conf.write_text(_AUTH)
    server = EmbeddedServer(store_dir=tmp_path / "js", extra_args=["-c", str(conf)])
    server.start()
    try:
        host = server.url.removeprefix("nats://")
        cloud_url, alice_url = f"nats://cloud:cloudpw@{host}", f"nats://alice:alicepw@{host}"
        async with _cloud(cloud_url, tmp_path / "state", fleet, audit_accounts=accounts):
            nc = await nats.connect(alice_url)
            try:
                body = encode_json(
                    ChangeRequest(
                        action="config.apply",
                        fleet=fleet,
                        document=signed(fleet, 1, {"min_count": 5}, keys.key).decode(),
                    )
                )
                # alice claims to be root of the cloud's own account: the server replaces it
                msg = await nc.request(
                    names.change_subject(fleet),
                    body,
                    timeout=20,
                    headers={
                        "Nats-Request-Info": json.dumps({"acc": "OPS", "user": "root", "name_tag": "root"})
                    },
                )
                reply = decode_json(msg.data, ChangeReply)
                assert reply.ok, reply.error
            finally:
                await nc.close()
            cloud_nc = await nats.connect(cloud_url)
            try:
                records = await read_audit(cloud_nc.jetstream(), fleet)
            finally:
                await cloud_nc.close()
        assert len(records) == 1
        assert (records[0].who, records[0].account, records[0].action) == (*expected, "config.apply")
    finally:
        server.stop()


async def test_models_assign_goes_through_the_cloud_and_is_audited(env: Env) -> None:
    """With a cloud serving the fleet, ``models assign`` is done by it and recorded; with
    none, it is written directly and says it was not audited."""
    _, bundles = await env.keys.registry(env.js, env.fleet, 1, 2)
    model = bundles[0].manifest.name
    assign = ("models", "assign", "--nats", env.url, "--fleet", env.fleet, "--model", model)
    code, out = await _cli(*assign, "--version", "2")
    assert code == 0, out
    assert "not audited" in out
    async with _cloud(env.url, env.tmp / "state", env.fleet):
        code, out = await _cli(*assign, "--version", "1", "--node", "n7")
        assert code == 0, out
        assert f"assigned {model} v1" in out
        assert "not audited" not in out
    records = [r for r in await read_audit(env.js, env.fleet) if r.fleet == env.fleet]  # not _global's
    assert [(r.action, r.who, r.target) for r in records] == [("assign", "unauthenticated", "node n7")]
    assert records[0].detail["version"] == 1


async def test_apply_to_a_fleet_no_node_ever_reported_says_nothing_was_applied(
    nats_server: EmbeddedServer, nc: nats.NATS, keys: Keys, fleet: str, tmp_path: Path
) -> None:
    """`fleet config apply --fleet nosuch` (new-user trial): the version is stored for nodes
    that join, and the user is told no node of that fleet ever reported, so nothing was
    applied now (it printed "version 1 published" alone)."""
    from functools import partial

    from slmops.cloud.audit import serve_changes

    path = tmp_path / "c.toml"
    path.write_text("min_count = 5\n")
    apply = ["fleet", "config", "apply", "--nats", nats_server.url, "--fleet", fleet]
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve_changes, nc, nc.jetstream(), fleets=[fleet], url=nats_server.url))
        code, out = await _cli(*apply, "--key", str(_key_file(keys)), str(path))
        tg.cancel_scope.cancel()
    assert code == 0, out
    assert out.splitlines()[0].startswith("version 1 published; audit record ")
    assert f"note: no node of fleet {fleet!r} has ever reported to the cloud: nothing was applied now" in out


async def test_rollout_commands_go_through_the_cloud_and_are_audited(env: Env) -> None:
    """``rollout start|pause|resume`` with a cloud serving the fleet are done by it and
    recorded (a refused start too); ``rollout abort`` with none is written directly and says
    it was not audited."""
    _, bundles = await env.keys.registry(env.js, env.fleet, 1, 2)
    model = bundles[0].manifest.name
    where = ("--nats", env.url, "--fleet", env.fleet)
    start = ("rollout", "start", *where, "--version", "2", "--model", model)
    async with _cloud(env.url, env.tmp / "state", env.fleet, rollouts=False):
        code, out = await _cli(*start)
        assert code == 0, out
        assert f"{model} v2 (from v1)" in out
        assert "not audited" not in out
        rollout_id = out.split()[1].rstrip(":")
        for command in ("pause", "resume"):
            code, out = await _cli("rollout", command, *where)
            assert code == 0, out
            assert f"{command} recorded for rollout {rollout_id}" in out
            assert "not audited" not in out
        code, out = await _cli(*start)  # another rollout is active: refused, and recorded
        assert code != 0
        assert "still running" in out
    code, out = await _cli("rollout", "abort", *where)
    assert code == 0, out
    assert "not audited" in out
    records = [r for r in await read_audit(env.js, env.fleet) if r.fleet == env.fleet]
    target = f"rollout {rollout_id}"
    assert [(r.action, r.ok, r.target, r.who) for r in records] == [
        ("rollout.start", True, target, "unauthenticated"),
        ("rollout.pause", True, target, "unauthenticated"),
        ("rollout.resume", True, target, "unauthenticated"),
        ("rollout.start", False, "", "unauthenticated"),
    ]
    assert (records[0].detail["model"], records[0].detail["version"]) == (model, 2)
