"""deploy/: the NATS configs run on a real nats-server and enforce what they promise; the
service, compose and k8s files parse and name what the README says.

Servers here are started from copies of the shipped configs with only addresses, ports and
store directories rewritten (each rewrite fails loudly if its text is gone from the config).
"""

from __future__ import annotations

import configparser
import contextlib
import gc
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import nats
import nats.errors
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js import api as js_api

from _nats import free_port, wait_until
from slmops.shared import names
from slmops.shared.connect import Link
from slmops.shared.errors import NatsUnavailable
from slmops.shared.kv import kv_get_direct, kv_keys
from slmops.shared.objects import fetch_object
from slmops.shared.provision import ensure_resources
from slmops.shared.server import find_nats_server

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
#: The password layouts (deploy/nats/jwt/ needs an auth.conf made per fleet: test_deploy_jwt.py).
CONFS = sorted(p for p in NATS_DIR.rglob("*.conf") if "jwt" not in p.relative_to(NATS_DIR).parts)

FLEET, NODE, OTHER = "shop", "till-001", "till-002"
OWN_KEY = names.assignment_key(FLEET, NODE)
CLOUD_PW = "EXAMPLE-cloud-password-CHANGE-ME"
NODE_PW = "EXAMPLE-node-till-001-password-CHANGE-ME"
BCRYPT_NODE_PW = "EXAMPLE-node-till-002-password-CHANGE-ME"
# Big enough that the server sends flow-control requests during an object download (it did
# from 8 MB on with nats-server 2.15 / nats-py 2.16; 2 MB downloads needed none).
BIG_OBJECT = 8 * 1024 * 1024


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_node_users", NATS_DIR / "make_node_users.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


# -- running servers from the shipped configs -------------------------------------------------


def _rewrite(text: str, replacements: dict[str, str], what: str) -> str:
    for old, new in replacements.items():
        if old not in text:
            pytest.fail(f"{what} no longer contains {old!r}: update tests/test_deploy.py with it")
        text = text.replace(old, new)
    return text


def _copy_conf(src: Path, dst: Path, replacements: dict[str, str]) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(_rewrite(src.read_text(), replacements, str(src.relative_to(ROOT))))
    return dst


def _local(store: Path | None) -> dict[str, str]:
    """Loopback on a free client port, no monitoring port, the store in the test's tmp dir."""
    out = {"listen: 0.0.0.0:4222": "listen: 127.0.0.1:-1", "http: 127.0.0.1:8222\n": ""}
    if store is not None:
        out['store_dir: "/var/lib/nats/jetstream"'] = f"store_dir: {json.dumps(str(store))}"
    return out


class _Server:
    """One nats-server process run from a config file; ``url`` without credentials."""

    def __init__(self, conf: Path, run_dir: Path) -> None:
        self.conf = conf
        self.run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def log(self) -> str:
        path = self.run_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        """Start and return once the ports file names the client URL (blocking: run it in a
        worker thread from async code)."""
        ports = self.run_dir / "ports"
        ports.mkdir(parents=True, exist_ok=True)
        for stale in ports.glob("*.ports"):  # from a previous run of this server
            stale.unlink()
        self.url = ""
        with (self.run_dir / "server.log").open("wb") as log:
            argv = [str(find_nats_server()), "-c", str(self.conf), "--ports_file_dir", str(ports)]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.url:
            if self.proc.poll() is not None:
                pytest.fail(f"nats-server -c {self.conf} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"nats-server -c {self.conf} wrote no ports file in {timeout}s:\n{self.log()}")
            for path in ports.glob("*.ports"):
                with contextlib.suppress(ValueError, KeyError, IndexError):  # half written: read again
                    self.url = json.loads(path.read_text())["nats"][0]
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def creds(self, user: str, password: str) -> str:
        return self.url.replace("nats://", f"nats://{user}:{password}@", 1)


@asynccontextmanager
async def _servers(*pairs: tuple[Path, Path]) -> AsyncIterator[list[_Server]]:
    """Start the servers in order (in a worker thread), stop them all at the end."""
    servers = [_Server(conf, run_dir) for conf, run_dir in pairs]
    try:
        for server in servers:
            await anyio.to_thread.run_sync(server.start)
        yield servers
    finally:
        with anyio.CancelScope(shield=True):
            for server in servers:
                await anyio.to_thread.run_sync(server.stop)


class _Client:
    """A nats-py client that records what arrives on ``error_cb`` (permission violations)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NATS | None = None
        self._arrived = anyio.Event()

    async def error_cb(self, exc: Exception) -> None:
        self.errors.append(str(exc))
        self._arrived.set()
        self._arrived = anyio.Event()

    async def wait_error(self, needle: str, timeout: float = 5.0) -> None:
        """Return once an error containing ``needle`` has arrived; TimeoutError after ``timeout``."""
        with anyio.fail_after(timeout):
            while not any(needle in e for e in self.errors):
                await self._arrived.wait()


@asynccontextmanager
async def _connect(url: str | list[str], node: str | None = None) -> AsyncIterator[tuple[NATS, _Client]]:
    client = _Client()
    nc = NATS()
    try:
        await nc.connect(
            url,
            inbox_prefix=names.inbox_prefix(FLEET if node else None, node),
            allow_reconnect=False,
            connect_timeout=5,
            error_cb=client.error_cb,
        )
    except BaseException:
        await nc.close()  # a refused connect leaves nats-py's socket open otherwise
        raise
    client.nc = nc
    try:
        yield nc, client
    finally:
        await nc.close()


async def _provision(url: str, replicas: int = 1, timeout: float = 30.0) -> None:
    """``ensure_resources`` as the cloud user, retried while JetStream elects its leaders."""
    with anyio.fail_after(timeout):
        while True:
            async with _connect(url) as (nc, _):
                try:
                    await ensure_resources(nc.jetstream(timeout=2), replicas=replicas)
                    return
                except NatsUnavailable:
                    await anyio.sleep(0.2)


async def _assert_denied_publish(js: Any, client: _Client, subject: str) -> None:
    """The server refuses ``subject``: the publisher only times out, the reason comes on error_cb."""
    with pytest.raises(nats.errors.TimeoutError):
        await js.publish(subject, b"x", timeout=1)
    await client.wait_error(f'permissions violation for publish to "{subject.lower()}"')


# -- every config parses ------------------------------------------------------------------------


def test_configs_exist() -> None:
    """The layouts the README offers are all there."""
    rel = {str(p.relative_to(NATS_DIR)) for p in CONFS}
    assert {"single.conf", "accounts.conf", "cluster/n1.conf", "cluster/n2.conf", "cluster/n3.conf"} <= rel
    assert {"leaf/hub.conf", "leaf/site.conf"} <= rel


@pytest.mark.parametrize("conf", CONFS, ids=[str(p.relative_to(NATS_DIR)) for p in CONFS])
def test_nats_config_passes_the_servers_config_test(conf: Path) -> None:
    """`nats-server -t -c FILE` accepts every shipped config (includes resolved in place)."""
    done = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("conf", "hub_domain"), [("single.conf", None), ("accounts.conf", None), ("leaf/site.conf", "hub")]
)
def test_node_user_in_configs_is_what_the_generator_prints(conf: str, hub_domain: str | None) -> None:
    """The example node user in each config is exactly the generator's block, so the rights
    tested on single.conf are the rights every layout ships."""
    block = gen.node_block(FLEET, NODE, NODE_PW, 6, hub_domain)
    assert block in (NATS_DIR / conf).read_text()


def test_generator_id_rule_matches_shared_names() -> None:
    """make_node_users.py (stdlib only) accepts exactly the ids shared.names does."""
    for candidate in ["till-001", "a", "A_b-9", "_fleet", "-x", "a.b", "a b", "", "x" * 64, "x" * 65]:
        try:
            names.validate_id(candidate)
            ok = True
        except ValueError:
            ok = False
        assert bool(gen._ID.fullmatch(candidate)) is ok, candidate


def test_generator_rejects_bad_ids_with_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(NATS_DIR / "make_node_users.py"), "--fleet", "shop", "till.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "node 'till.1' is not valid" in done.stderr


# -- single.conf on a real server ----------------------------------------------------------------


@pytest.fixture
async def single(tmp_path: Path) -> AsyncIterator[_Server]:
    """A server run from deploy/nats/single.conf, provisioned by the cloud user, with the
    node's assignment, the fleet-wide assignment and a manifest written by the cloud."""
    conf = _copy_conf(NATS_DIR / "single.conf", tmp_path / "single.conf", _local(tmp_path / "js"))
    async with _servers((conf, tmp_path / "run")) as (server,):
        await _provision(server.creds("cloud", CLOUD_PW))
        async with _connect(server.creds("cloud", CLOUD_PW)) as (nc, client):
            js = nc.jetstream()
            kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
            await kv.put(names.assignment_key(FLEET, NODE), b"own-v1")
            await kv.put(names.assignment_key(FLEET), b"fleet-v1")
            await kv.put(names.assignment_key(FLEET, OTHER), b"other-v1")
            manifests = await js.key_value(names.MODELS_MANIFEST_BUCKET)
            await manifests.put(names.manifest_key("other-model", 1, "fp32"), b"manifest-1")
            assert client.errors == []
        yield server


@pytest.mark.anyio
async def test_single_node_publishes_its_own_telemetry_and_status_with_acks(single: _Server) -> None:
    """The node user's JetStream publishes to its own subjects are stored and acked."""
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        js = nc.jetstream()
        ack = await js.publish(
            names.telemetry_subject(FLEET, NODE),
            b"aggregate",
            headers={"Nats-Msg-Id": names.msg_id(NODE, 1)},
            timeout=5,
        )
        assert ack.stream == names.TELEMETRY_STREAM
        again = await js.publish(
            names.telemetry_subject(FLEET, NODE),
            b"aggregate",
            headers={"Nats-Msg-Id": names.msg_id(NODE, 1)},
            timeout=5,
        )
        assert again.duplicate is True
        status = await js.publish(names.status_subject(FLEET, NODE), b"{}", timeout=5)
        assert status.stream == names.STATUS_STREAM
        assert client.errors == []


@pytest.mark.anyio
async def test_single_node_is_denied_other_subjects_and_all_writes(single: _Server) -> None:
    """Another node's subjects, drift events, KV writes and stream management are refused;
    the publisher sees a timeout and the reason arrives on error_cb (docs/architecture.md §9)."""
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        js = nc.jetstream(timeout=1)
        await _assert_denied_publish(js, client, names.telemetry_subject(FLEET, OTHER))
        await _assert_denied_publish(js, client, names.status_subject("other-fleet", NODE))
        await _assert_denied_publish(js, client, names.drift_subject(FLEET))
        await _assert_denied_publish(js, client, f"$KV.{names.ASSIGNMENTS_BUCKET}.{FLEET}.{NODE}")
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream(names.TELEMETRY_STREAM)
        await client.wait_error('permissions violation for publish to "$js.api.stream.delete')
        # Nothing it tried reached the streams.
    async with _connect(single.creds("cloud", CLOUD_PW)) as (nc, _):
        info = await nc.jetstream().stream_info(names.TELEMETRY_STREAM)
        assert info.state.messages == 0
        kv = await nc.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
        assert (await kv.get(names.assignment_key(FLEET, NODE))).value == b"own-v1"


@pytest.mark.anyio
async def test_single_node_reads_and_watches_its_assignment(single: _Server) -> None:
    """The node reads its own and the fleet-wide key, and is woken by the cloud's update
    through a core subscription on its own key's subject (no consumer)."""
    async with (
        _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client),
        _connect(single.creds("cloud", CLOUD_PW)) as (cloud, _),
    ):
        kv = await nc.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
        assert (await kv.get(names.assignment_key(FLEET, NODE))).value == b"own-v1"
        assert (await kv.get(names.assignment_key(FLEET))).value == b"fleet-v1"
        manifests = await nc.jetstream().key_value(names.MODELS_MANIFEST_BUCKET)
        assert (await manifests.get(names.manifest_key("other-model", 1, "fp32"))).value == b"manifest-1"

        # The watch as edge/refresh.py makes it: subscriptions on its assignment subjects.
        subs = [await nc.subscribe(s) for s in names.assignment_subjects(FLEET, NODE)]
        await nc.flush()
        cloud_kv = await cloud.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
        await cloud_kv.put(names.assignment_key(FLEET, NODE), b"own-v2")
        await cloud_kv.put(names.assignment_key(FLEET, None, "m2"), b"fleet-m2")
        woken = await subs[0].next_msg(timeout=5)  # headers only: the value is read by direct get
        assert woken.subject == f"{names.ASSIGNED_PREFIX}.{names.assignment_key(FLEET, NODE)}"
        assert woken.data == b""
        assert (await subs[3].next_msg(timeout=5)).subject.endswith(f"{FLEET}._fleet.m2")
        for sub in subs:
            await sub.unsubscribe()
        assert client.errors == []


@pytest.mark.anyio
async def test_single_node_creates_no_consumer_and_watches_no_other_key(single: _Server) -> None:
    """Issue 13 fault 11: a node could create consumers (``$JS.API.CONSUMER.CREATE.<stream>``
    carries the filter and the push target in the body, where permissions cannot look), pick
    the names of model-chunk consumers (taking the model store's slots) and aim a push
    consumer at another node's inbox. Now a node holds no consumer right at all: every form —
    nats-py's KV watch, the filtered-subject form on its own key, a named chunk download, a
    push consumer aimed at another inbox, a durable — is refused, and it may not subscribe to
    another node's wake-up subject nor the bucket's own KV subjects."""
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        js = nc.jetstream(timeout=1)
        kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await kv.watch(names.assignment_key(FLEET, NODE))
        await client.wait_error(
            f'permissions violation for publish to "$js.api.consumer.create.kv_{names.ASSIGNMENTS_BUCKET}'
        )
        own = f"$KV.{names.ASSIGNMENTS_BUCKET}.{names.assignment_key(FLEET, NODE)}"
        tries: list[tuple[str, js_api.ConsumerConfig]] = [
            (f"KV_{names.ASSIGNMENTS_BUCKET}", js_api.ConsumerConfig(name="w", filter_subject=own)),
            (
                "OBJ_slmops_models",
                js_api.ConsumerConfig(name="dl-mine", filter_subject=f"$O.{names.MODELS_BUCKET}.C.x"),
            ),
            (
                "OBJ_slmops_models",
                js_api.ConsumerConfig(
                    name="tap",
                    filter_subject=f"$O.{names.MODELS_BUCKET}.C.x",
                    deliver_subject=f"{names.inbox_prefix(FLEET, OTHER)}.x",
                ),
            ),
            (names.TELEMETRY_STREAM, js_api.ConsumerConfig(durable_name="d")),
        ]
        for stream, config in tries:
            with pytest.raises(nats.errors.TimeoutError):
                await js.add_consumer(stream, config, timeout=1)
            kind = "durable.create" if config.durable_name else "create"
            await client.wait_error(f'for publish to "$js.api.consumer.{kind}.{stream.lower()}')
        for subject in (
            f"{names.ASSIGNED_PREFIX}.{names.assignment_key(FLEET, OTHER)}",
            f"$KV.{names.ASSIGNMENTS_BUCKET}.{names.assignment_key(FLEET, NODE)}",
        ):
            await nc.subscribe(subject)
            await client.wait_error(f'for subscription to "{subject.lower()}')
    async with _connect(single.creds("cloud", CLOUD_PW)) as (cloud, _):
        for stream in (f"KV_{names.ASSIGNMENTS_BUCKET}", names.TELEMETRY_STREAM, "OBJ_slmops_models"):
            assert await cloud.jetstream().consumers_info(stream) == []


@pytest.mark.anyio
async def test_single_node_cannot_create_any_of_200_consumers(single: _Server) -> None:
    """Issue 13 fault 11 found 200 of 200 consumer creations allowed to a node (then 128 of
    200, the model store's bound, with named chunk consumers). Now: 200 creations through the
    chunk form with names the node chose, and 20 watches of its own key, are all refused by
    permission; no consumer exists afterwards, and the streams and the account keep their
    bounds for other users."""
    from slmops.shared.provision import MODELS_MAX_CONSUMERS

    tries = 200
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        for i in range(tries):
            config = js_api.ConsumerConfig(
                name=f"c{i}",
                filter_subject=f"$O.{names.MODELS_BUCKET}.C.x{i}",
                ack_policy=js_api.AckPolicy.NONE,
                inactive_threshold=3600,
            )
            body = json.dumps({"stream_name": "OBJ_slmops_models", "config": config.as_dict()}).encode()
            subject = f"$JS.API.CONSUMER.CREATE.OBJ_slmops_models.c{i}.{config.filter_subject}"
            await nc.publish(subject, body, reply=f"{names.inbox_prefix(FLEET, NODE)}.probe")
        own = f"$KV.{names.ASSIGNMENTS_BUCKET}.{names.assignment_key(FLEET, NODE)}"
        for i in range(20):
            stream = f"KV_{names.ASSIGNMENTS_BUCKET}"
            config = js_api.ConsumerConfig(name=f"w{i}", filter_subject=own, ack_policy=js_api.AckPolicy.NONE)
            body = json.dumps({"stream_name": stream, "config": config.as_dict()}).encode()
            await nc.publish(f"$JS.API.CONSUMER.CREATE.{stream}.w{i}.{own}", body)
        await nc.flush()
        with anyio.fail_after(30):
            while sum("consumer.create" in e for e in client.errors) < tries + 20:
                await client._arrived.wait()
    async with _connect(single.creds("cloud", CLOUD_PW)) as (cloud, _):
        js = cloud.jetstream()
        assert await js.consumers_info(f"KV_{names.ASSIGNMENTS_BUCKET}") == []
        assert await js.consumers_info("OBJ_slmops_models") == []
        for stream, bound in (
            (f"KV_{names.ASSIGNMENTS_BUCKET}", 8192),
            (f"KV_{names.MODELS_MANIFEST_BUCKET}", 1024),
            ("OBJ_slmops_models", MODELS_MAX_CONSUMERS),
        ):
            assert (await js.stream_info(stream)).config.max_consumers == bound, stream
        account = await js.account_info()
        assert account.limits.max_consumers == 16_384


@pytest.mark.anyio
async def test_single_node_cannot_read_another_nodes_assignment(single: _Server) -> None:
    """Issue 13 fault 11: ``STREAM.MSG.GET`` (what nats-py's KV get used on these buckets)
    carries the key in the request body, so node credentials let it read any node's
    assignment. Now a node reads by direct get by subject (``shared.kv.kv_get_direct``), its own key
    and its fleet's only; MSG.GET and the body form of DIRECT.GET are refused."""
    stream = f"KV_{names.ASSIGNMENTS_BUCKET}"
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        js = nc.jetstream(timeout=1)
        assert await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, OWN_KEY) == b"own-v1"
        assert await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, names.assignment_key(FLEET)) == b"fleet-v1"
        with pytest.raises(NatsUnavailable, match="did not answer in time"):  # a refused read times out
            await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, names.assignment_key(FLEET, OTHER))
        await client.wait_error(f".$kv.{names.ASSIGNMENTS_BUCKET}.{FLEET}.{OTHER}")
        other = f"$KV.{names.ASSIGNMENTS_BUCKET}.{names.assignment_key(FLEET, OTHER)}"
        for subject in (f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}"):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(subject, json.dumps({"last_by_subj": other}).encode(), timeout=1)
            await client.wait_error(f'permissions violation for publish to "{subject.lower()}"')
        with pytest.raises(nats.errors.TimeoutError):  # nats-py's own KV get
            await (await js.key_value(names.ASSIGNMENTS_BUCKET)).get(names.assignment_key(FLEET, OTHER))
        assert not any("other-v1" in e for e in client.errors)


@pytest.mark.anyio
async def test_single_node_reads_its_per_model_keys_and_no_other_nodes(single: _Server) -> None:
    """Models side by side (issue 11): a node finds its own and its fleet's per-model keys by
    listing key names (stream info) and reads them by direct get; another node's per-model
    key stays unreadable."""
    own, fleet_wide, other = (
        names.assignment_key(FLEET, NODE, "embedder.v"),
        names.assignment_key(FLEET, None, "embedder.v"),
        names.assignment_key(FLEET, OTHER, "embedder.v"),
    )
    async with _connect(single.creds("cloud", CLOUD_PW)) as (nc, _):
        kv = await nc.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
        for key in (own, fleet_wide, other):
            await kv.put(key, key.encode())
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        js = nc.jetstream(timeout=1)
        assert await kv_keys(js, names.ASSIGNMENTS_BUCKET, f"{OWN_KEY}.>") == [own]
        assert await kv_keys(js, names.ASSIGNMENTS_BUCKET, f"{names.assignment_key(FLEET)}.>") == [fleet_wide]
        assert await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, own) == own.encode()
        assert await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, fleet_wide) == fleet_wide.encode()
        with pytest.raises(NatsUnavailable, match="did not answer in time"):
            await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, other)
        await client.wait_error(f".$kv.{names.ASSIGNMENTS_BUCKET}.{other.lower()}")


@pytest.mark.anyio
async def test_single_node_downloads_a_model_bundle_object(single: _Server) -> None:
    """The node downloads an object big enough to need flow-control replies, byte-exact."""
    blob = os.urandom(BIG_OBJECT)
    name = names.model_object_name("kw", 1, "fp32")
    async with _connect(single.creds("cloud", CLOUD_PW)) as (cloud, _):
        store = await cloud.jetstream().object_store(names.MODELS_BUCKET)
        await store.put(name, blob)
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        out = io.BytesIO()
        with anyio.fail_after(30):  # as the edge does (a named, filtered consumer)
            await fetch_object(nc.jetstream(), names.MODELS_BUCKET, name, out)
        assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(blob).digest()
        denied = await nc.jetstream(timeout=1).object_store(names.MODELS_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await denied.put("evil/1/fp32", b"x")
        await client.wait_error('permissions violation for publish to "$o.slmops_models')
        assert not any("$js.fc" in e for e in client.errors)


@pytest.mark.anyio
async def test_single_bcrypt_node_logs_in_and_wrong_password_is_refused(single: _Server) -> None:
    """till-002's bcrypt-hashed password works, a wrong one and a missing one are refused,
    and till-002 may not publish as till-001."""
    async with _connect(single.creds(f"node-{OTHER}", BCRYPT_NODE_PW), node=OTHER) as (nc, client):
        js = nc.jetstream()
        ack = await js.publish(names.telemetry_subject(FLEET, OTHER), b"aggregate", timeout=5)
        assert ack.stream == names.TELEMETRY_STREAM
        await _assert_denied_publish(js, client, names.telemetry_subject(FLEET, NODE))
    for url in (single.creds(f"node-{OTHER}", "wrong"), single.url):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            async with _connect(url, node=OTHER):
                pass


@pytest.mark.anyio
async def test_single_node_cannot_receive_other_inboxes(single: _Server) -> None:
    """A node may subscribe only to its own inbox prefix, so it cannot read others' replies."""
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        await nc.subscribe(f"{names.inbox_prefix(FLEET, OTHER)}.>")
        await client.wait_error(
            f'permissions violation for subscription to "{names.inbox_prefix(FLEET, OTHER).lower()}'
        )
        await nc.subscribe(names.telemetry_subject(FLEET, OTHER))
        await client.wait_error('permissions violation for subscription to "slmops.telemetry')


@pytest.mark.anyio
async def test_single_analyst_reads_drift_events_live_and_cannot_publish(single: _Server) -> None:
    """The analyst user receives the cloud's drift events (core NATS, live) and may publish
    nothing, not even a fake drift event."""
    async with (
        _connect(single.creds("analyst", "EXAMPLE-analyst-password-CHANGE-ME")) as (nc, client),
        _connect(single.creds("cloud", CLOUD_PW)) as (cloud, _),
    ):
        sub = await nc.subscribe(names.drift_subject(FLEET))
        await nc.flush()
        await cloud.jetstream().publish(names.drift_subject(FLEET), b'{"event": 1}', timeout=5)
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b'{"event": 1}'
        await nc.publish(names.drift_subject(FLEET), b"fake")
        await client.wait_error(f'permissions violation for publish to "{names.drift_subject(FLEET)}"')
        await nc.subscribe(names.telemetry_subject(FLEET, NODE))
        await client.wait_error('permissions violation for subscription to "slmops.telemetry')


@pytest.mark.anyio
async def test_single_cloud_ingests_with_a_durable_pull_consumer_and_acks(single: _Server) -> None:
    """The cloud user can do what the cloud does: pull, ack, publish drift, write KV."""
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, _):
        await nc.jetstream().publish(names.telemetry_subject(FLEET, NODE), b"agg", timeout=5)
    async with _connect(single.creds("cloud", CLOUD_PW)) as (nc, client):
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "slmops.telemetry.>",
            durable="ingest-test",
            stream=names.TELEMETRY_STREAM,
            config=js_api.ConsumerConfig(ack_wait=30),
        )
        msgs = await sub.fetch(1, timeout=5)
        assert [m.data for m in msgs] == [b"agg"]
        await msgs[0].ack_sync(timeout=5)
        info = await js.consumer_info(names.TELEMETRY_STREAM, "ingest-test")
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
        ack = await js.publish(names.drift_subject(FLEET), b"{}", timeout=5)
        assert ack.stream == names.DRIFT_STREAM
        assert client.errors == []


@pytest.mark.anyio
async def test_single_cloud_service_runs_as_the_cloud_user(
    single: _Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real CloudService, logged in as `cloud`, takes its lease (its own KV buckets with
    TTL), consumes what node till-001 publishes and acks it, and logs no permission error."""
    import numpy as np
    from _cloud_util import cloud_config, make_aggregate, publish

    from slmops.cloud.service import CloudService

    rng = np.random.default_rng(0)
    async with _connect(single.creds(f"node-{NODE}", NODE_PW), node=NODE) as (nc, client):
        for seq in (1, 2, 3):
            await publish(nc.jetstream(), make_aggregate(FLEET, NODE, seq, 50, rng))
        assert client.errors == []
    config = cloud_config(single.creds("cloud", CLOUD_PW), tmp_path / "cloud", FLEET)
    async with CloudService(config) as svc:
        await svc.wait_active(20)
        await wait_until(
            lambda: (n := svc.nodes.get((FLEET, NODE))) is not None and n.aggregates == 3,
            20,
            what="3 applied",
        )
    async with _connect(single.creds("cloud", CLOUD_PW)) as (nc, _):
        infos = [await nc.jetstream().consumer_info(names.TELEMETRY_STREAM, c) for c in await _consumers(nc)]
        assert infos
        assert all(i.num_ack_pending == 0 for i in infos)
    out = capsys.readouterr()
    assert "permissions violation" not in (out.out + out.err).lower(), out


async def _consumers(nc: NATS) -> list[str]:
    resp = await nc.request(f"$JS.API.CONSUMER.NAMES.{names.TELEMETRY_STREAM}", b"{}", timeout=5)
    return list(json.loads(resp.data)["consumers"] or [])


# -- the 3-node cluster ---------------------------------------------------------------------------


def _cluster_confs(tmp_path: Path) -> list[tuple[Path, Path]]:
    """cluster/n1..n3.conf on loopback (free client and route ports, stores in ``tmp_path``):
    (config, run directory) pairs for ``_servers``. A restarted server keeps its route port."""
    (tmp_path / "accounts.conf").write_text((NATS_DIR / "accounts.conf").read_text())
    route_ports = {n: free_port() for n in (1, 2, 3)}
    pairs = []
    for n in (1, 2, 3):
        rewrites = _local(tmp_path / f"js{n}")
        rewrites["listen: 0.0.0.0:6222"] = f"listen: 127.0.0.1:{route_ports[n]}"
        for m in (1, 2, 3):
            rewrites[f"@n{m}:6222"] = f"@127.0.0.1:{route_ports[m]}"
        conf = _copy_conf(NATS_DIR / "cluster" / f"n{n}.conf", tmp_path / "cluster" / f"n{n}.conf", rewrites)
        pairs.append((conf, tmp_path / f"run{n}"))
    return pairs


async def _wait_replicated(js: Any, timeout: float = 30.0) -> None:
    """Until every stream has two current followers: scaling up copies the data in the
    background, and a server may only go down once that is done (as the README tells operators)."""

    async def all_replicated() -> bool:
        for stream in await js.streams_info():
            followers = (stream.cluster.replicas if stream.cluster else None) or []
            if len(followers) != 2 or not all(f.current for f in followers):
                return False
        return True

    await wait_until(all_replicated, timeout, what="every stream with 2 current followers")


async def _publish_until_acked(url: str | list[str], subject: str, msg_id: str, timeout: float = 30.0) -> Any:
    """Publish (same Nats-Msg-Id each try, as the edge outbox does) until a PubAck comes:
    right after a start or a server loss JetStream answers 503 until leaders are elected."""
    with anyio.fail_after(timeout):
        while True:
            try:
                async with _connect(url, node=NODE) as (nc, _):
                    return await nc.jetstream().publish(
                        subject, b"aggregate", headers={"Nats-Msg-Id": msg_id}, timeout=2
                    )
            except (nats.errors.Error, OSError):
                await anyio.sleep(0.2)


@pytest.mark.anyio
# nats-py 2.16 drops the StreamWriter of a connection it loses without closing it (a
# ResourceWarning when collected); that is the library's, not what this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_cluster_configs_form_a_cluster_that_keeps_r3_data_when_a_server_stops(tmp_path: Path) -> None:
    """cluster/n1..n3.conf form one JetStream cluster; set_replicas.py takes the resources
    `slmops cloud` provisions to 3 replicas; they take node publishes, and keep taking them
    (with the data) after one server stops — also through slmops' Link given only the stopped
    server's URL, or all three comma-separated."""
    async with _servers(*_cluster_confs(tmp_path)) as servers:
        # As `slmops cloud` does (one replica), then set_replicas.py as the README says.
        await _provision(servers[0].creds("cloud", CLOUD_PW))
        argv = [
            sys.executable,
            str(NATS_DIR / "set_replicas.py"),
            "3",
            "--nats",
            servers[1].creds("cloud", CLOUD_PW),
        ]
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "KV_slmops_assignments" in done.stdout
        assert "OBJ_slmops_models" in done.stdout
        assert "1 -> 3" in done.stdout
        # nats-py takes several servers as a list (a comma-separated string is refused).
        node_url = [s.creds(f"node-{NODE}", NODE_PW) for s in servers]
        subject = names.telemetry_subject(FLEET, NODE)
        ack = await _publish_until_acked(node_url, subject, names.msg_id(NODE, 1))
        assert ack.stream == names.TELEMETRY_STREAM
        async with _connect(servers[1].creds("cloud", CLOUD_PW)) as (nc, _):
            js = nc.jetstream()
            assert all(s.config.num_replicas == 3 for s in await js.streams_info())

            await _wait_replicated(js)

        # slmops' own Link, given only n1 (it learns n2, n3 from the cluster) or all three as
        # the comma-separated SLMOPS_NATS_URL, fails over with the node's credentials.
        only_n1 = servers[0].creds(f"node-{NODE}", NODE_PW)
        all_three = ",".join(s.creds(f"node-{NODE}", NODE_PW) for s in servers)
        async with (
            Link(only_n1, fleet=FLEET, node=NODE, reconnect_time_wait=0.1) as link_a,
            Link(all_three, fleet=FLEET, node=NODE, reconnect_time_wait=0.1) as link_b,
        ):
            await link_a.wait_online(10)
            await link_b.wait_online(10)
            await anyio.to_thread.run_sync(servers[0].stop)
            for n, link in enumerate((link_a, link_b), start=2):
                with anyio.fail_after(30):
                    while True:
                        try:
                            await link.js.publish(
                                subject,
                                b"aggregate",
                                headers={"Nats-Msg-Id": names.msg_id(NODE, n)},
                                timeout=2,
                            )
                            break
                        except (nats.errors.Error, NatsUnavailable, OSError):
                            await anyio.sleep(0.2)
            gc.collect()  # let nats-py's dropped-writer warnings fire inside this test (filtered)
        survivors = [s.creds(f"node-{NODE}", NODE_PW) for s in servers[1:]]
        ack = await _publish_until_acked(survivors, subject, names.msg_id(NODE, 4))
        assert ack.seq == 4
        assert not ack.duplicate
        async with _connect(servers[2].creds("cloud", CLOUD_PW)) as (nc, _):
            info = await nc.jetstream().stream_info(names.TELEMETRY_STREAM)
            assert info.state.messages == 4


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
async def test_cluster_loses_a_server_during_a_fleet_run_and_nothing_is_lost_or_counted_twice(
    tmp_path: Path,
) -> None:
    """Issue 18, short version (the long one: `slmops bench fleet`). The cloud service (one
    active instance, given all three URLs) ingests two nodes' windows from an R3 cluster;
    mid-run server n1 is stopped, later started again on the same store. The nodes publish
    like the edge's outbox (each window until its PubAck, same Nats-Msg-Id) through slmops'
    Link, so they fail over; the cloud goes on ingesting; at the end each node's windows
    were counted exactly once (counts, inferences, no missing seq)."""
    import numpy as np
    from _cloud_util import make_aggregate, make_manifest, put_manifest

    from slmops.cloud.config import CloudConfig
    from slmops.cloud.service import CloudService
    from slmops.shared.messages import encode_telemetry

    rng = np.random.default_rng(18)
    windows = 30
    nodes = {NODE: NODE_PW, OTHER: BCRYPT_NODE_PW}
    aggs = {n: [make_aggregate(FLEET, n, s, 60, rng) for s in range(1, windows + 1)] for n in nodes}
    async with _servers(*_cluster_confs(tmp_path)) as servers:
        await _provision(servers[0].creds("cloud", CLOUD_PW), replicas=3)
        async with _connect(servers[1].creds("cloud", CLOUD_PW)) as (nc, _):
            await _wait_replicated(nc.jetstream())
            await put_manifest(nc.jetstream(), make_manifest())
        cloud_url = ",".join(s.creds("cloud", CLOUD_PW) for s in servers)
        config = CloudConfig(nats_url=cloud_url, state_dir=str(tmp_path / "cloud"), fleets=[FLEET])
        sent = dict.fromkeys(nodes, 0)

        async def node(name: str, link: Link) -> None:
            await link.wait_online(30)
            for agg in aggs[name]:
                mid = names.msg_id(name, agg.seq, FLEET)
                with anyio.fail_after(60):
                    while True:  # the outbox: until the PubAck, same id (the stream dedupes)
                        try:
                            await link.js.publish(
                                names.telemetry_subject(FLEET, name),
                                encode_telemetry(agg),
                                headers={"Nats-Msg-Id": mid},
                                timeout=2,
                            )
                            break
                        except (nats.errors.Error, NatsUnavailable, OSError):
                            await anyio.sleep(0.2)
                sent[name] = agg.seq
                await anyio.sleep(0.05)

        def applied(svc: CloudService) -> dict[str, int]:
            return {n: st.aggregates for (f, n), st in svc.nodes.items() if f == FLEET}

        urls = {n: ",".join(s.creds(f"node-{n}", pw) for s in servers) for n, pw in nodes.items()}

        async def _run_nodes(tg: Any, link_a: Link, link_b: Link) -> None:
            tg.start_soon(node, NODE, link_a)
            tg.start_soon(node, OTHER, link_b)
            await wait_until(lambda: min(sent.values()) >= windows // 3, 60, what="a third sent")
            await anyio.to_thread.run_sync(servers[0].stop)
            await wait_until(lambda: min(sent.values()) >= 2 * windows // 3, 60, what="sent without n1")
            # Ingest goes on without n1 (not only after it is back).
            await wait_until(
                lambda: min(applied(svc).values(), default=0) >= 2 * windows // 3,
                60,
                what="applied without n1",
            )
            await anyio.to_thread.run_sync(servers[0].start)

        async with CloudService(config) as svc:
            await svc.wait_active(30)
            # The cloud made its own buckets (leases, fleet snapshots) with one replica; the
            # operator then scales everything to three, as deploy/README.md says.
            argv = [sys.executable, str(NATS_DIR / "set_replicas.py"), "3", "--nats", cloud_url]
            done = await anyio.to_thread.run_sync(
                lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
            )
            assert done.returncode == 0, done.stdout + done.stderr
            async with _connect(servers[2].creds("cloud", CLOUD_PW)) as (nc, _):
                await _wait_replicated(nc.jetstream(), 60)
            async with (
                Link(urls[NODE], fleet=FLEET, node=NODE, reconnect_time_wait=0.1) as link_a,
                Link(urls[OTHER], fleet=FLEET, node=OTHER, reconnect_time_wait=0.1) as link_b,
                anyio.create_task_group() as tg,
            ):
                await _run_nodes(tg, link_a, link_b)
            await wait_until(lambda: applied(svc) == dict.fromkeys(nodes, windows), 90, what="all applied")
            for name, st in ((n, st) for (f, n), st in svc.nodes.items() if f == FLEET):
                assert st.inferences == sum(a.count for a in aggs[name])
                assert all(e.seqs.missing == 0 for e in st.epochs.values())
            gc.collect()  # nats-py's dropped-writer warnings fire inside this test (filtered)


# -- hub and site leaf node -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_leaf_site_without_jetstream_passes_node_traffic_to_the_hub(tmp_path: Path) -> None:
    """A device logged in at the site (no JetStream there) gets PubAcks, KV reads and watches
    and a model download from the hub's JetStream, with slmops' plain (domain-less) JetStream
    API; its permissions are enforced at the site; with the hub down its publish
    is not acked (the edge keeps it in its outbox), and the retry with the same Nats-Msg-Id
    is stored once the hub is back."""
    (tmp_path / "accounts.conf").write_text((NATS_DIR / "accounts.conf").read_text())
    leaf_port = free_port()
    hub_rewrites = _local(tmp_path / "js")
    hub_rewrites["listen: 0.0.0.0:7422"] = f"listen: 127.0.0.1:{leaf_port}"
    hub_conf = _copy_conf(NATS_DIR / "leaf" / "hub.conf", tmp_path / "leaf" / "hub.conf", hub_rewrites)
    site_rewrites = _local(None)
    site_rewrites["@hub.example.com:7422"] = f"@127.0.0.1:{leaf_port}"
    site_conf = _copy_conf(NATS_DIR / "leaf" / "site.conf", tmp_path / "leaf" / "site.conf", site_rewrites)
    assert "jetstream {" not in site_conf.read_text().replace("# jetstream {", "")

    async with _servers((hub_conf, tmp_path / "hub"), (site_conf, tmp_path / "site")) as (hub, site):
        await _provision(hub.creds("cloud", CLOUD_PW))
        async with _connect(hub.creds("cloud", CLOUD_PW)) as (nc, _):
            kv = await nc.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
            await kv.put(names.assignment_key(FLEET, NODE), b"own-v1")
            blob, name = os.urandom(BIG_OBJECT), names.model_object_name("kw", 1, "fp32")
            await (await nc.jetstream().object_store(names.MODELS_BUCKET)).put(name, blob)

        at_site = site.creds(f"node-{NODE}", NODE_PW)
        subject = names.telemetry_subject(FLEET, NODE)
        ack = await _publish_until_acked(at_site, subject, names.msg_id(NODE, 1))  # leaf link up
        assert ack.stream == names.TELEMETRY_STREAM
        assert ack.seq == 1
        async with _connect(at_site, node=NODE) as (nc, client):
            js = nc.jetstream(timeout=2)
            # Read and watch as edge/refresh.py does: a direct get by subject, a subscription on
            # its own key's subject (the interest crosses the leaf link to the hub).
            assert await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, OWN_KEY) == b"own-v1"
            sub = await nc.subscribe(names.assignment_subjects(FLEET, NODE)[0])
            await nc.flush()
            # Interest crosses the leaf link asynchronously: the cloud writes until one arrives.
            async with _connect(hub.creds("cloud", CLOUD_PW)) as (cloud, _):
                cloud_kv = await cloud.jetstream().key_value(names.ASSIGNMENTS_BUCKET)
                with anyio.fail_after(10):
                    while True:
                        await cloud_kv.put(names.assignment_key(FLEET, NODE), b"own-v2")
                        try:
                            woken = await sub.next_msg(timeout=0.5)
                            break
                        except nats.errors.TimeoutError:
                            continue
            assert woken.subject.endswith(names.assignment_key(FLEET, NODE))
            assert await kv_get_direct(js, names.ASSIGNMENTS_BUCKET, OWN_KEY) == b"own-v2"
            await sub.unsubscribe()
            out = io.BytesIO()
            with anyio.fail_after(30):
                await fetch_object(js, names.MODELS_BUCKET, name, out)
            assert out.getvalue() == blob
            await _assert_denied_publish(js, client, names.telemetry_subject(FLEET, OTHER))
            assert not any("$js.fc" in e or "$js.api" in e or "$js.hub" in e for e in client.errors)

        await anyio.to_thread.run_sync(hub.stop)
        async with _connect(at_site, node=NODE) as (nc, _):
            with pytest.raises(nats.errors.Error):  # no responders or timeout: nothing acked
                await nc.jetstream().publish(
                    subject, b"aggregate", headers={"Nats-Msg-Id": names.msg_id(NODE, 2)}, timeout=2
                )
        await anyio.to_thread.run_sync(hub.start)
        ack = await _publish_until_acked(at_site, subject, names.msg_id(NODE, 2))
        assert ack.seq == 2
        async with _connect(hub.creds("cloud", CLOUD_PW)) as (nc, _):
            info = await nc.jetstream().stream_info(names.TELEMETRY_STREAM)
            assert info.state.messages == 2


# -- the real edge node with generated credentials -------------------------------------------------


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= and `set -a; . file` read them."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


@pytest.mark.anyio
async def test_real_edge_node_with_generated_credentials_installs_its_model_and_reports(
    tmp_path: Path,
) -> None:
    """The whole operator path: make_node_users.py (bcrypt) prints a user block and writes the
    node's env file; single.conf with that block runs; `slmops edge` started with only that env
    file (as the systemd unit does) connects, follows its fleet's assignment (KV watch, object
    download), serves predictions and sends status and telemetry — with no permission error."""
    from _edge_util import Keys
    from slmops.cloud.registry import Registry
    from slmops.shared.bundle import TrustStore

    node, port = "till-777", free_port()
    env_dir = tmp_path / "env"
    done = subprocess.run(
        [
            sys.executable, str(NATS_DIR / "make_node_users.py"), "--fleet", FLEET, "--bcrypt",
            "--env-dir", str(env_dir), "--url", f"nats://127.0.0.1:{port}", node,
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "$2" in done.stdout  # a bcrypt hash, not the password
    env_file = env_dir / f"{node}.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    env = _read_env_file(env_file)
    assert env["SLMOPS_EDGE_NODE"] == node
    assert env["SLMOPS_EDGE_FLEET"] == FLEET
    assert env["SLMOPS_NATS_URL"].split("@")[0].split(":")[-1] not in done.stdout

    rewrites = _local(tmp_path / "js")
    rewrites["listen: 0.0.0.0:4222"] = f"listen: 127.0.0.1:{port}"
    rewrites["      # Example 2:"] = done.stdout + "      # Example 2:"
    conf = _copy_conf(NATS_DIR / "single.conf", tmp_path / "single.conf", rewrites)
    keys = Keys(tmp_path / "keys")
    async with _servers((conf, tmp_path / "run")) as (server,):
        await _provision(server.creds("cloud", CLOUD_PW))
        async with _connect(server.creds("cloud", CLOUD_PW)) as (nc, _):
            registry = Registry(nc.jetstream())
            await registry.push(keys.bundle(1, name="kw"), TrustStore([keys.key.public_key()]))
            await registry.assign(FLEET, 1, model="kw")

        log_path = tmp_path / "edge.log"
        argv = [
            sys.executable, "-m", "slmops.cli", "--log-json", "edge", "--data", str(tmp_path / "data"),
            "--trust", str(keys.pub), "--http", "127.0.0.1:0", "--window", "200ms", "--min-count", "1",
            "--status-interval", "1s",
        ]  # fmt: skip
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, env={**clean, **env}, cwd=ROOT, stdout=log, stderr=log)
        try:
            await _exercise_edge(server, node, proc, log_path)
        finally:
            proc.terminate()
            await anyio.to_thread.run_sync(proc.wait, 30)
        text = log_path.read_text()
        assert "permissions violation" not in text.lower(), text
        assert '"nats_error"' not in text, text


async def _exercise_edge(server: _Server, node: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    import aiohttp

    def log_events() -> list[dict[str, Any]]:
        events = []
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a traceback line shows in the failure message
                events.append(json.loads(line))
        return events

    with anyio.fail_after(60):
        port = None
        while port is None:
            assert proc.poll() is None, log_path.read_text()
            port = next((e["port"] for e in log_events() if e.get("event") == "http_listening"), None)
            await anyio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            while True:  # 503 until the assigned model is downloaded and installed
                if proc.poll() is not None:
                    errors = [e for e in log_events() if e.get("level") in ("warning", "error")]
                    pytest.fail(f"slmops edge exited {proc.returncode}; its warnings/errors: {errors}")
                resp = await http.post(f"http://127.0.0.1:{port}/v1/predict", json={"texts": ["alpha"] * 5})
                body = await resp.json()
                if resp.status == 200:
                    break
                assert resp.status == 503, body
                await anyio.sleep(0.1)
        assert body["model"]["name"] == "kw"
        assert body["model"]["version"] == 1
        async with _connect(server.creds("cloud", CLOUD_PW)) as (nc, _):
            js = nc.jetstream()
            # It made no consumer (issue 13 fault 11): no watch, no download consumer.
            assert await js.consumers_info(f"KV_{names.ASSIGNMENTS_BUCKET}") == []
            assert await js.consumers_info("OBJ_slmops_models") == []
            for subject in (names.telemetry_subject(FLEET, node), names.status_subject(FLEET, node)):
                stream = names.TELEMETRY_STREAM if "telemetry" in subject else names.STATUS_STREAM
                while True:
                    try:
                        await js.get_last_msg(stream, subject)
                        break
                    except nats.js.errors.NotFoundError:
                        await anyio.sleep(0.1)


# -- service units, env files, compose, k8s, Dockerfile -------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def test_systemd_units_exist() -> None:
    assert [u.name for u in UNITS] == ["nats-server.service", "slmops-cloud.service", "slmops-edge.service"]


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_unit_parses_and_is_hardened(unit: Path) -> None:
    """Each unit is INI with [Unit]/[Service]/[Install], restarts always, runs unprivileged
    with a state directory, and (where systemd-analyze exists) verifies without a warning."""
    parser = _unit(unit)
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    service = parser["Service"]
    assert service["Restart"] == "always"
    assert service.get("DynamicUser") == "yes" or service.get("User") == "nats"
    assert service["StateDirectory"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    if unit.name.startswith("slmops-"):
        role = unit.name.removeprefix("slmops-").removesuffix(".service")
        assert service["EnvironmentFile"] == f"/etc/slmops/{role}.env"
        assert (DEPLOY / "systemd" / f"{role}.env.example").is_file()
        flag = "--data" if role == "edge" else "--state"
        assert service["ExecStart"].split()[1:5] == ["--log-json", role, flag, "${STATE_DIRECTORY}"]
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is not None:
        # Verify a copy whose binaries exist here; unknown keys or bad values print warnings.
        copy = unit.read_text().replace("/opt/slmops/venv/bin/slmops", "/bin/true")
        copy = copy.replace("/usr/local/bin/nats-server", "/bin/true")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / unit.name
            path.write_text(copy)
            done = subprocess.run(
                [systemd_analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60
            )
        assert done.returncode == 0
        assert unit.name not in done.stdout + done.stderr, done.stdout + done.stderr


def _env_names(role: str) -> set[str]:
    """The environment variables `slmops <role>` reads (click: an explicit envvar, else the
    auto_envvar_prefix SLMOPS + command + parameter name)."""
    from slmops.cli import main

    command = main.commands[role]
    out = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        out.add(envvar if isinstance(envvar, str) else f"SLMOPS_{role.upper()}_{(param.name or '').upper()}")
    return out


@pytest.mark.parametrize("role", ["edge", "cloud"])
def test_environment_names_in_deploy_files_are_ones_slmops_reads(role: str) -> None:
    """Every SLMOPS_<ROLE>_* / SLMOPS_NATS_URL name deploy/ uses for `slmops edge` or
    `slmops cloud` (set or commented) is one that command really reads: no setting is
    silently ignored."""
    known = _env_names(role)
    files = [
        DEPLOY / "systemd" / f"{role}.env.example",
        DEPLOY / "systemd" / f"slmops-{role}.service",
        DEPLOY / "compose.yaml",
        DEPLOY / "container" / "Dockerfile",
        *(DEPLOY / "k8s").glob("*.yaml"),
    ]
    used = {m for f in files for m in re.findall(rf"SLMOPS_{role.upper()}_[A-Z_]+", f.read_text())}
    assert used, f"no SLMOPS_{role.upper()}_ variable found: the pattern or the files changed"
    assert used <= known, f"not read by `slmops {role}`: {sorted(used - known)}"
    assert "SLMOPS_NATS_URL" in known
    assert "SLMOPS_NATS_URL" in _read_env_file(DEPLOY / "systemd" / f"{role}.env.example")


def test_compose_file_names_nats_cloud_and_two_edges() -> None:
    """compose.yaml is YAML; nats runs single.conf; cloud and edges build the right targets."""
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"nats", "cloud", "edge-1", "edge-2"}
    assert "./nats/single.conf:/etc/nats/nats-server.conf:ro" in services["nats"]["volumes"]
    assert services["cloud"]["build"]["target"] == "cloud"
    for name, node in (("edge-1", "till-001"), ("edge-2", "till-002")):
        svc = services[name]
        assert svc["build"]["target"] == "edge"
        assert svc["environment"]["SLMOPS_EDGE_NODE"] == node
        assert svc["environment"]["SLMOPS_NATS_URL"].startswith(f"nats://node-{node}:")
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert (DEPLOY / services["cloud"]["build"]["dockerfile"].removeprefix("deploy/")).is_file()


def test_k8s_manifests_parse_and_hold_nats_cloud_and_edge_daemonset() -> None:
    docs = [
        d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d
    ]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "nats"), ("Service", "nats"), ("Deployment", "slmops-cloud")} <= kinds
    assert ("DaemonSet", "slmops-edge") in kinds
    assert all(d.get("apiVersion") for d in docs)
    assert all(d["metadata"].get("namespace") == "slmops" for d in docs if d["kind"] != "Namespace")
    cloud = next(d for d in docs if d["kind"] == "Deployment")
    assert cloud["spec"]["replicas"] == 1
    edge = next(d for d in docs if d["kind"] == "DaemonSet")
    volumes = {v["name"]: v for v in edge["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["hostPath"]["path"] == "/var/lib/slmops-edge"


def test_dockerfile_has_edge_and_cloud_targets_with_the_right_extras() -> None:
    text = (DEPLOY / "container" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim AS" in text
    targets = re.findall(r"^FROM \S+ AS (\w+)$", text, flags=re.MULTILINE)
    assert {"edge", "cloud"} <= set(targets)
    edge = text[text.index("AS edge") : text.index("AS cloud")]
    cloud = text[text.index("AS cloud") :]
    assert "pip install /tmp/src " in edge
    assert "[cloud]" not in edge
    assert 'pip install "/tmp/src[cloud]"' in cloud
