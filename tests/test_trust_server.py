"""Per-device identities against a real nats-server in operator mode (issue 17): what a
node's creds allow and refuse, revocation of a connected node without a restart, unknown keys,
the analyst role. Every denied action is tried with the node's real creds and the server's
own permissions error (it arrives on ``error_cb``) is asserted. Servers run on free loopback
ports (``_nats.operator_server``); everything is at default settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import api as js_api

from _nats import operator_server
from slmops.cloud.trust import FleetDir
from slmops.shared import names
from slmops.shared.connect import connect_attempt
from slmops.shared.errors import NatsUnavailable
from slmops.shared.identity import decode_jwt, encode_jwt, new_key, read_creds, write_creds
from slmops.shared.keylist import KEYLIST_KEY
from slmops.shared.kv import kv_get_direct
from slmops.shared.objects import fetch_object
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

FLEET, A, B = "shop", "till-a", "till-b"


@dataclass
class _Client:
    """One connection's callbacks, recorded."""

    errors: list[str] = field(default_factory=list)
    disconnects: int = 0
    #: time.monotonic() of the first disconnect.
    disconnected_at: float | None = None
    reconnects: int = 0
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def error_cb(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())
        self.arrived.set()
        self.arrived = anyio.Event()

    async def disconnected_cb(self) -> None:
        self.disconnects += 1
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
        self.arrived.set()
        self.arrived = anyio.Event()

    async def reconnected_cb(self) -> None:
        self.reconnects += 1

    async def wait_error(self, needle: str, timeout: float = 5.0) -> str:
        """The first error containing ``needle`` (lower case); TimeoutError after ``timeout``."""
        with anyio.fail_after(timeout):
            while True:
                for e in self.errors:
                    if needle in e:
                        return e
                await self.arrived.wait()


@asynccontextmanager
async def _connect(url: str, creds: Path, node: str | None = None) -> AsyncIterator[tuple[NATS, _Client]]:
    client = _Client()
    nc = await nats.connect(
        url,
        user_credentials=str(creds),
        inbox_prefix=names.inbox_prefix(FLEET if node else None, node),
        error_cb=client.error_cb,
        disconnected_cb=client.disconnected_cb,
        reconnected_cb=client.reconnected_cb,
    )
    try:
        yield nc, client
    finally:
        await nc.close()


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedServer, FleetDir]]:
    """An operator-mode server with two enrolled nodes of fleet ``shop``, assignments for
    both and a model object written by the cloud."""
    async with operator_server(tmp_path / "fleet") as (server, fleet_dir):
        for node in (A, B):
            fleet_dir.enroll("node", fleet=FLEET, node=node)
        async with _connect(server.url, fleet_dir.cloud_creds) as (nc, client):
            js = nc.jetstream()
            kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
            for node in (A, B):
                await kv.put(names.assignment_key(FLEET, node), f"{node}-v1".encode())
            store = await js.object_store(names.MODELS_BUCKET)
            await store.put("m/1/fp32", os.urandom(3 * 1024 * 1024 + 17))
            assert client.errors == []
        yield server, fleet_dir


def _creds(fleet_dir: FleetDir, node: str) -> Path:
    return fleet_dir.path / "creds" / "nodes" / FLEET / f"{node}.creds"


async def _denied_publish(nc: NATS, client: _Client, subject: str) -> str:
    """Publish to ``subject`` as a JetStream publish would; return the server's error."""
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subject, b"x", timeout=1)
    return await client.wait_error(f'permissions violation for publish to "{subject.lower()}"')


async def test_node_publishes_its_own_subjects_and_cannot_publish_as_another(
    op: tuple[EmbeddedServer, FleetDir],
) -> None:
    """Node A's own telemetry and status are stored (PubAck); B's telemetry and status, a
    drift event, a KV put, an object put and stream deletion are refused by the server."""
    server, fleet_dir = op
    async with _connect(server.url, _creds(fleet_dir, A), A) as (nc, client):
        js = nc.jetstream(timeout=5)
        ack = await js.publish(names.telemetry_subject(FLEET, A), b"agg", headers={"Nats-Msg-Id": "a:1"})
        assert ack.stream == names.TELEMETRY_STREAM
        assert (await js.publish(names.status_subject(FLEET, A), b"{}")).stream == names.STATUS_STREAM
        for subject in (
            names.telemetry_subject(FLEET, B),
            names.status_subject(FLEET, B),
            names.drift_subject(FLEET),
            f"$KV.{names.ASSIGNMENTS_BUCKET}.{names.assignment_key(FLEET, A)}",
            f"$O.{names.MODELS_BUCKET}.C.x",
            f"$JS.API.STREAM.DELETE.{names.TELEMETRY_STREAM}",
        ):
            await _denied_publish(nc, client, subject)
    async with _connect(server.url, fleet_dir.cloud_creds) as (cloud, _):
        info = await cloud.jetstream().stream_info(names.TELEMETRY_STREAM)
        assert info.state.messages == 1


async def test_node_reads_its_own_assignment_and_model_and_not_another_nodes(
    op: tuple[EmbeddedServer, FleetDir],
) -> None:
    """A reads its own key by direct get by subject and downloads a model object (batched
    direct gets) byte-exact; B's key by subject, the body forms that hide the key
    (``DIRECT.GET`` / ``STREAM.MSG.GET`` on the bucket) and B's wake-up subject are refused."""
    server, fleet_dir = op
    async with _connect(server.url, _creds(fleet_dir, A), A) as (nc, client):
        js = nc.jetstream(timeout=1)
        assert (
            await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, names.assignment_key(FLEET, A)) == b"till-a-v1"
        )
        with pytest.raises(NatsUnavailable):
            await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, names.assignment_key(FLEET, B))
        await client.wait_error(f'"$js.api.direct.get.kv_{names.ASSIGNMENTS_BUCKET}.$kv.')
        assert any(f".{FLEET}.{B}" in e for e in client.errors)
        other = f"$KV.{names.ASSIGNMENTS_BUCKET}.{names.assignment_key(FLEET, B)}"
        stream = f"KV_{names.ASSIGNMENTS_BUCKET}"
        for subject in (f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}"):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(subject, json.dumps({"last_by_subj": other}).encode(), timeout=1)
            await client.wait_error(f'permissions violation for publish to "{subject.lower()}"')
        await nc.subscribe(names.assignment_subjects(FLEET, B)[0])
        await client.wait_error(
            f'permissions violation for subscription to "{names.ASSIGNED_PREFIX}.{FLEET}.{B}"'
        )
        await nc.subscribe(f"{names.inbox_prefix(FLEET, B)}.>")
        await client.wait_error(f'permissions violation for subscription to "_inbox_{FLEET}.{B}.>"')

        blob = await _download(nc)
        assert len(blob) == 3 * 1024 * 1024 + 17
        own = await nc.subscribe(names.assignment_subjects(FLEET, A)[0])
        async with _connect(server.url, fleet_dir.cloud_creds) as (cloud, _):
            kv = await cloud.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
            await kv.put(names.assignment_key(FLEET, A), b"till-a-v2")
        woken = await own.next_msg(timeout=5)  # the republished put, headers only
        assert woken.data == b""
        assert (
            await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, names.assignment_key(FLEET, A)) == b"till-a-v2"
        )


async def _download(nc: NATS) -> bytes:
    import io

    out = io.BytesIO()
    with anyio.fail_after(30):
        await fetch_object(nc.jetstream(timeout=5), names.MODELS_BUCKET, "m/1/fp32", out)
    return out.getvalue()


async def test_node_cannot_create_any_consumer(op: tuple[EmbeddedServer, FleetDir]) -> None:
    """Issue 13 fault 11 with per-device creds: nats-py's KV watch and object get, a chunk
    consumer named by the node (the model store's 128 slots), a push consumer aimed at B's
    inbox and a durable are all refused; the server holds no consumer afterwards."""
    server, fleet_dir = op
    async with _connect(server.url, _creds(fleet_dir, A), A) as (nc, client):
        js = nc.jetstream(timeout=1)
        kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await kv.watch(names.assignment_key(FLEET, A))
        await client.wait_error(f'"$js.api.consumer.create.kv_{names.ASSIGNMENTS_BUCKET}')
        chunk = f"$O.{names.MODELS_BUCKET}.C.x"
        tries = [
            ("OBJ_slmops_models", js_api.ConsumerConfig(name="mine", filter_subject=chunk), "create"),
            (
                "OBJ_slmops_models",
                js_api.ConsumerConfig(
                    name="tap", filter_subject=chunk, deliver_subject=f"{names.inbox_prefix(FLEET, B)}.x"
                ),
                "create",
            ),
            (names.TELEMETRY_STREAM, js_api.ConsumerConfig(durable_name="d"), "durable.create"),
        ]
        for stream, config, kind in tries:
            with pytest.raises(nats.errors.TimeoutError):
                await js.add_consumer(stream, config, timeout=1)
            await client.wait_error(
                f'permissions violation for publish to "$js.api.consumer.{kind}.{stream.lower()}'
            )
        store = await js.object_store(names.MODELS_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await store.get("m/1/fp32")
    async with _connect(server.url, fleet_dir.cloud_creds) as (cloud, _):
        for stream in (f"KV_{names.ASSIGNMENTS_BUCKET}", "OBJ_slmops_models", names.TELEMETRY_STREAM):
            assert await cloud.jetstream().consumers_info(stream) == []


async def test_a_node_reads_the_signed_key_list_with_its_own_creds(
    op: tuple[EmbeddedServer, FleetDir],
) -> None:
    """The key list (``edge/keys.py``) is read by direct get with the node's own rights: without
    them key rotation and revocation never reach a node enrolled with creds (new-user trial:
    "permissions violation for publish to $js.api.direct.get.kv_slmops_keys…")."""
    server, fleet_dir = op
    async with _connect(server.url, fleet_dir.cloud_creds) as (cloud, _):
        kv = await cloud.jetstream().key_value(names.KEYS_BUCKET)
        await kv.put(KEYLIST_KEY, b"signed-list-bytes")
    async with _connect(server.url, _creds(fleet_dir, A), A) as (nc, client):
        js = nc.jetstream(timeout=5)
        assert await kv_get_direct(js, names.KEYS_BUCKET, KEYLIST_KEY) == b"signed-list-bytes"
        assert client.errors == []


async def test_a_node_id_reused_in_another_fleet_cannot_read_the_first_ones_replies(
    op: tuple[EmbeddedServer, FleetDir],
) -> None:
    """Node ids repeat across fleets (``till-a`` in ``shop`` and in ``mall``); each one's inbox
    right names its fleet, so ``mall``'s till-a is refused ``shop``'s till-a inbox, and a reply
    to a request of shop's till-a (its own direct get) still reaches it."""
    server, fleet_dir = op
    fleet_dir.enroll("node", fleet="mall", node=A)
    mall_creds = fleet_dir.path / "creds" / "nodes" / "mall" / f"{A}.creds"
    async with _connect(server.url, mall_creds) as (nc, client):
        await nc.subscribe(f"{names.inbox_prefix(FLEET, A)}.>")
        await client.wait_error(
            f'permissions violation for subscription to "{names.inbox_prefix(FLEET, A).lower()}.>"'
        )
    async with _connect(server.url, _creds(fleet_dir, A), A) as (nc, client):
        js = nc.jetstream(timeout=5)
        got = await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, names.assignment_key(FLEET, A))
        assert got == f"{A}-v1".encode()
        assert client.errors == []


async def test_revoked_node_is_cut_off_within_seconds_and_another_stays_connected(
    op: tuple[EmbeddedServer, FleetDir],
) -> None:
    """``slmops fleet revoke`` (the real command) pushes the new account JWT through the
    system account: A is disconnected at once and its reconnects are refused ("authorization
    violation"), a fresh connect with its creds is refused; B, connected throughout, never
    dropped nor reconnected and still gets PubAcks. No server restart."""
    server, fleet_dir = op
    async with (
        _connect(server.url, _creds(fleet_dir, A), A) as (a, a_client),
        _connect(server.url, _creds(fleet_dir, B), B) as (b, b_client),
    ):
        pid = server.pid
        started = time.monotonic()
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "slmops.cli", "fleet", "revoke", "--auth", str(fleet_dir.path),
                 "--fleet", FLEET, "--node", A, "--nats", server.url],
                capture_output=True, text=True, timeout=60,
            )
        )  # fmt: skip
        finished = time.monotonic()
        assert done.returncode == 0, done.stdout + done.stderr
        assert "jwt updated" in done.stdout
        with anyio.fail_after(5):  # "within seconds" of the command's answer
            while a_client.disconnected_at is None:
                await a_client.arrived.wait()
        cut = a_client.disconnected_at
        print(
            f"revoked node disconnected {cut - started:.2f}s after `fleet revoke` started, "
            f"{cut - finished:+.2f}s relative to its exit"
        )
        # The server said why before closing; nats-py closes on it instead of reconnecting.
        assert "revoked" in str(a.last_error).lower(), a.last_error
        assert a.is_closed
        await _refused(server.url, _creds(fleet_dir, A))
        ack = await b.jetstream(timeout=5).publish(names.telemetry_subject(FLEET, B), b"still here")
        assert ack.stream == names.TELEMETRY_STREAM
        assert (b_client.disconnects, b_client.reconnects) == (0, 0)
        assert b.is_connected
        assert b_client.errors == []
        assert server.pid == pid  # the same process: no restart
    # A node enrolled again gets a new key, which the revocation does not cover (read the
    # directory again: the revocation was the CLI's; its old creds are dead, so no --force).
    again = FleetDir(fleet_dir.path).enroll("node", fleet=FLEET, node=A)
    async with _connect(server.url, again.creds, A) as (nc, client):
        ack = await nc.jetstream(timeout=5).publish(names.telemetry_subject(FLEET, A), b"new key")
        assert ack.stream == names.TELEMETRY_STREAM
        assert client.errors == []


async def _refused(url: str, creds: Path) -> None:
    """A connect with ``creds`` is refused by the server ("authorization violation")."""
    errors: list[str] = []

    async def record(exc: Exception) -> None:
        errors.append(str(exc).lower())

    with pytest.raises(Exception):  # noqa: B017,PT011 -- nats-py's own error, or NoServersError
        await connect_attempt(url, user_credentials=str(creds), allow_reconnect=False, error_cb=record)
    assert any("authorization violation" in e for e in errors), (creds.name, errors)


async def test_unknown_keys_are_refused(op: tuple[EmbeddedServer, FleetDir], tmp_path: Path) -> None:
    """Creds of another operator's fleet, a user signed by a signing key the account does not
    list (claiming our account), and a JWT whose claims were edited are all refused."""
    server, fleet_dir = op
    stranger = FleetDir.init(tmp_path / "stranger").enroll("node", fleet=FLEET, node=A)
    rogue_signer, user = new_key("account"), new_key("user")
    rogue = tmp_path / "rogue.creds"
    claims = {"pub": {"allow": [">"]}, "sub": {"allow": [">"]}, "issuer_account": fleet_dir.account_public}
    write_creds(rogue, encode_jwt("user", user.public, "rogue", claims, rogue_signer), user)
    token, key = read_creds(_creds(fleet_dir, A))
    head, body, sig = token.split(".")
    import base64

    parsed = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    parsed["nats"]["pub"]["allow"] = [">"]
    forged_body = base64.urlsafe_b64encode(json.dumps(parsed).encode()).rstrip(b"=").decode()
    forged = tmp_path / "forged.creds"
    write_creds(forged, f"{head}.{forged_body}.{sig}", key)
    for creds in (stranger.creds, rogue, forged):
        await _refused(server.url, creds)
    assert decode_jwt(token).subject == key.public


async def test_analyst_reads_drift_live_and_cannot_publish(op: tuple[EmbeddedServer, FleetDir]) -> None:
    """The analyst role receives drift events live and is refused every publish (its own
    fleet's drift subject, telemetry, a JetStream API request)."""
    server, fleet_dir = op
    made = fleet_dir.enroll("analyst", name="alice")
    async with (
        _connect(server.url, made.creds) as (nc, client),
        _connect(server.url, fleet_dir.cloud_creds) as (cloud, _),
    ):
        sub = await nc.subscribe(names.DRIFT_ALL)
        await nc.flush()
        await cloud.publish(names.drift_subject(FLEET), b'{"event": 1}')
        assert (await sub.next_msg(timeout=5)).data == b'{"event": 1}'
        for subject in (names.drift_subject(FLEET), names.telemetry_subject(FLEET, A), "$JS.API.INFO"):
            await nc.publish(subject, b"x")
            await client.wait_error(f'permissions violation for publish to "{subject.lower()}"')
        await nc.subscribe(names.TELEMETRY_ALL)
        await client.wait_error('permissions violation for subscription to "slmops.telemetry.>"')


async def test_an_operator_command_with_a_nodes_creds_says_permission_denied(
    op: tuple[EmbeddedServer, FleetDir],
) -> None:
    """`slmops status` (or `fleet status`: the same path) run with a node's creds: the server
    refuses its requests (the refusal reaches only nats-py's error callback, the request then
    times out); the user is told "permission denied" and what was refused, not that JetStream
    did not answer, nor that NATS is unreachable."""
    from click.testing import CliRunner

    from slmops.cli import main

    server, fleet_dir = op
    args = ["status", "--json", "--nats", server.url, "--creds", str(_creds(fleet_dir, A))]
    result = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, args))
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    # A node may subscribe only under its own inbox prefix, and no JetStream API is open to it.
    assert error[0].startswith("Error: permission denied: subscription to "), error
    assert 'publish to "$js.api.' in error[0]
    assert "did not answer in time" not in error[0]
    doc = json.loads(result.output.splitlines()[0])
    assert doc["nats"]["reachable"] is True
    assert doc["nats"]["error"] == error[0].removeprefix("Error: ")
