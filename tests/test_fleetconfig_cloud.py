"""Fleet configuration through the cloud (issue 17): ``slmops fleet config`` apply / show /
history / rollback against a real cloud service, nats-server and edge nodes; staged rollouts
gated on "applied and healthy"; the audit stream records the identity the server
authenticated and never one the client wrote."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import nats
import pytest
from _cloud_util import cloud_config
from _fleetcfg import config_state, signed
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from nats.js import JetStreamContext

from _edge_util import Keys, Statuses, edge_config
from _nats import wait_until
from slmops.cli import main
from slmops.cloud.audit import read_audit
from slmops.cloud.fleetconfig import ConfigStore
from slmops.cloud.rollout.cohort import cohort
from slmops.cloud.service import CloudService
from slmops.edge.fleetconfig import PROBATION_S
from slmops.edge.node import EdgeNode
from slmops.shared import names
from slmops.shared.audit import ChangeReply, ChangeRequest
from slmops.shared.messages import decode_json, encode_json
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

WAIT = PROBATION_S * 3


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
async def _cloud(url: str, state: Path, fleet: str) -> AsyncIterator[CloudService]:
    async with CloudService(cloud_config(url, state, fleet)) as svc:
        await svc.wait_active(30)
        yield svc


async def test_apply_show_history_rollback_and_audit_without_auth(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> None:
    url = nats_server.url
    key = str(_key_file(keys))
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=url, model=keys.bundle().path)
    v1 = tmp_path / "v1.toml"
    v1.write_text('min_count = 4\nstatus_interval = "6s"\n[safety]\nmax_error_rate = 0.1\n')
    v2 = tmp_path / "v2.toml"
    v2.write_text("min_count = 8\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("min_count = 4\nturbo = true\n")
    async with _cloud(url, tmp_path / "state", fleet), EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        # a file with a key that is not pushable: refused before anything is published
        code, out = await _cli(
            "fleet", "config", "apply", "--nats", url, "--fleet", fleet, "--key", key, str(bad)
        )
        assert code == 2, out
        assert "turbo" in out
        code, out = await _cli(
            "fleet", "config", "apply", "--nats", url, "--fleet", fleet, "--key", key, str(v1)
        )
        assert code == 0, out
        assert "version 1 published" in out
        await wait_until(
            lambda: config_state(statuses.items, "n1", 1, "applied") is not None, WAIT, what="v1"
        )
        assert node.buffer.k == 4
        code, out = await _cli("fleet", "config", "show", "--nats", url, "--fleet", fleet, "--json")
        assert code == 0, out
        shown = json.loads(out)
        assert shown["keys"]["_fleet"]["version"] == 1
        assert shown["nodes"]["n1"]["state"] == "applied"
        code, out = await _cli(
            "fleet", "config", "apply", "--nats", url, "--fleet", fleet, "--key", key, str(v2)
        )
        assert code == 0, out
        await wait_until(
            lambda: config_state(statuses.items, "n1", 2, "applied") is not None, WAIT, what="v2"
        )
        assert node.buffer.k == 8
        code, out = await _cli(
            "fleet", "config", "rollback", "--nats", url, "--fleet", fleet, "--key", key, "--to", "1"
        )
        assert code == 0, out
        assert "version 3 published" in out
        await wait_until(
            lambda: config_state(statuses.items, "n1", 3, "applied") is not None, WAIT, what="v3"
        )
        assert node.buffer.k == 4
        assert node.status.interval == 6.0
        code, out = await _cli("fleet", "config", "history", "--nats", url, "--fleet", fleet, "--json")
        assert code == 0, out
        docs = [json.loads(line) for line in out.splitlines()]
        assert [d["version"] for d in docs] == [1, 2, 3]
        assert docs[2]["note"] == "rollback to v1"
        assert docs[2]["settings"] == docs[0]["settings"]

        # A client that writes its own identity: a body field and a forged server header.
        forged = {
            **json.loads(encode_json(ChangeRequest(action="config.apply", fleet=fleet))),
            "document": signed(fleet, 4, {"min_count": 5}, keys.key).decode(),
            "who": "admin",
        }
        nc = await nats.connect(url)
        try:
            msg = await nc.request(
                names.change_subject(fleet),
                json.dumps(forged).encode(),
                timeout=20,
                headers={
                    "Nats-Request-Info": json.dumps({"acc": "OPS", "user": "mallory", "name_tag": "mallory"})
                },
            )
            assert decode_json(msg.data, ChangeReply).ok
            # a version that is not newer is refused, and the refusal is recorded too
            stale = {**forged, "document": signed(fleet, 2, {"min_count": 5}, keys.key).decode()}
            msg = await nc.request(names.change_subject(fleet), json.dumps(stale).encode(), timeout=20)
            refused = decode_json(msg.data, ChangeReply)
            assert not refused.ok
            assert "not newer" in (refused.error or "")
            # hostile request bodies: answered, recorded, the service goes on
            for body in (
                b"",
                b"[" * 50_000,
                b'{"action": 1}',
                b"\xff" * 1000,
                b'{"action":"config.apply","fleet":"../x"}',
            ):
                msg = await nc.request(names.change_subject(fleet), body, timeout=20)
                assert not decode_json(msg.data, ChangeReply).ok
        finally:
            await nc.close()
        records = await read_audit(js, fleet)
        assert [r.action for r in records if r.ok] == [
            "config.apply",
            "config.apply",
            "config.rollback",
            "config.apply",
        ]
        assert {r.who for r in records} == {"unauthenticated"}
        assert any(not r.ok and "not newer" in (r.reason or "") for r in records)
        code, out = await _cli("audit", "--nats", url, "--fleet", fleet)
        assert code == 0, out
        assert "config.rollback" in out
        assert "unauthenticated" in out
        assert "mallory" not in out
        assert "admin" not in out


async def test_staged_config_rollout_waits_for_applied_and_healthy_and_halts_on_a_refusal(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> None:
    url = nats_server.url
    nodes = ["n1", "n2", "n3"]
    canary = sorted(cohort(fleet, nodes, 30))
    assert len(canary) == 1
    key = str(_key_file(keys))
    conf = tmp_path / "c.toml"
    conf.write_text("min_count = 3\n")
    bundle = keys.bundle().path
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(_cloud(url, tmp_path / "state", fleet))
        running = {}
        for n in nodes:
            running[n] = await stack.enter_async_context(
                EdgeNode(edge_config(tmp_path, keys, fleet=fleet, node=n, url=url, model=bundle))
            )
        for n in nodes:
            await running[n].link.wait_online(10)
        store = await ConfigStore(js).open()
        await wait_until(lambda: _known(store, fleet, nodes), 20, what="all nodes reported")
        code, out = await _cli(
            "fleet",
            "config",
            "apply",
            "--nats",
            url,
            "--fleet",
            fleet,
            "--key",
            key,
            "--stages",
            "30,100",
            str(conf),
        )
        assert code == 0, out
        assert f"nodes now: {canary[0]}" in out
        others = [n for n in nodes if n not in canary]
        await wait_until(
            lambda: config_state(statuses.items, canary[0], 1, "applied") is not None, WAIT, what="canary"
        )
        canary_at = statuses.items.index(config_state(statuses.items, canary[0], 1, "applied"))  # type: ignore[arg-type]
        # until the canary said "applied", nobody else had the version
        assert all(s.config_seen != 1 for s in statuses.items[:canary_at] if s.node in others)
        for n in others:
            await wait_until(
                lambda n=n: config_state(statuses.items, n, 1, "applied") is not None, WAIT, what=n
            )
        await wait_until(lambda: _rollout_status(store, fleet, "completed"), 20, what="rollout completed")
        assert (await store.current(fleet)).keys() >= {"_fleet"}
        assert all(running[n].buffer.k == 3 for n in nodes)

        # Version 2 is refused by the canary (a value under the pushed bounds): halted there.
        conf.write_text("min_count = 6\n")
        code, out = await _cli(
            "fleet",
            "config",
            "apply",
            "--nats",
            url,
            "--fleet",
            fleet,
            "--key",
            key,
            "--stages",
            "30,100",
            str(conf),
        )
        assert code == 0, out
        await wait_until(
            lambda: config_state(statuses.items, canary[0], 2, "applied") is not None, WAIT, what="v2"
        )
        # make the canary's next version fail its probation: a pushed URL nobody listens on
        conf.write_text('min_count = 6\nnats_url = "nats://127.0.0.1:9"\n')
        code, out = await _cli(
            "fleet",
            "config",
            "apply",
            "--nats",
            url,
            "--fleet",
            fleet,
            "--key",
            key,
            "--stages",
            "30,100",
            str(conf),
        )
        assert code == 0, out
        await wait_until(lambda: _rollout_status(store, fleet, "halted"), WAIT * 2, what="rollout halted")
        assert all(running[n].fleetcfg.saved.highest < 3 for n in others)
        records = await read_audit(js, fleet)
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


async def test_audit_records_the_identity_the_server_authenticated(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text(_AUTH)
    server = EmbeddedServer(store_dir=tmp_path / "js", extra_args=["-c", str(conf)])
    server.start()
    try:
        host = server.url.removeprefix("nats://")
        cloud_url, alice_url = f"nats://cloud:cloudpw@{host}", f"nats://alice:alicepw@{host}"
        async with _cloud(cloud_url, tmp_path / "state", fleet):
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
        assert (records[0].who, records[0].account, records[0].action) == ("alice", "OPS", "config.apply")
    finally:
        server.stop()
