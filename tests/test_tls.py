"""TLS to NATS (issue 17): `slmops server` with TLS and mutual TLS, and node, cloud and CLI
connecting over it with --tls-ca/--tls-cert/--tls-key (or SLMOPS_TLS_*); a wrong CA, a missing
or foreign client certificate and a plain-text server all fail closed with the certificate
problem named, never a hang or a traceback. The PKI is made per test with `cryptography`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest
from _tls import Pki, make_pki
from click.testing import CliRunner

from _edge_proc import Client
from _edge_proc import start as start_edge
from _edge_util import Keys
from _models import make_bundle
from _nats import free_port, new_fleet, wait_until
from slmops.cli import main
from slmops.shared.connect import ConnectOptions, Link, LinkState, connect_once
from slmops.shared.errors import NatsUnavailable
from slmops.shared.server import EmbeddedServer, ServerTls

pytestmark = pytest.mark.anyio

SLMOPS = [sys.executable, "-m", "slmops.cli"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@contextmanager
def tls_server(pki: Pki, *, mutual: bool) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(tls=ServerTls(pki.server_cert, pki.server_key, pki.ca if mutual else None))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def client_flags(pki: Pki, *, cert: bool) -> list[str]:
    flags = ["--tls-ca", str(pki.ca)]
    return [*flags, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)] if cert else flags


@asynccontextmanager
async def server_process(pki: Pki, tmp_path: Path, *, mutual: bool) -> AsyncIterator[str]:
    """`slmops server` with TLS (mutual TLS when ``mutual``) on a free port; yields its URL."""
    port = free_port()
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    if mutual:
        tls += ["--tls-ca", str(pki.ca)]
    errlog = tmp_path / "server.log"
    with errlog.open("wb") as err:
        proc = await anyio.open_process(
            [*SLMOPS, "--log-json", "server", "--port", str(port), "--store", str(tmp_path / "js"), *tls],
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        seen = b""
        with anyio.fail_after(30):
            while b"ready at" not in seen:
                seen += await proc.stdout.receive()
        url = f"tls://127.0.0.1:{port}"
        assert url in seen.decode(), seen
        assert b"server_provision_skipped" not in errlog.read_bytes(), errlog.read_text()
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(20, shield=True):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_server_node_cloud_and_cli_all_connect_over_tls(
    pki: Pki, tmp_path: Path, keys: Keys, mutual: bool
) -> None:
    """`slmops server --tls-cert/--tls-key [--tls-ca]`, an `slmops edge` given its TLS files
    through SLMOPS_TLS_*, an `slmops cloud` and `slmops fleet status` given them as flags: the
    node reports, the cloud holds its lease and records the node online, the CLI reads it."""
    fleet = new_fleet()
    bundle = make_bundle(tmp_path / "bundle", keys.key)
    pub = keys.pub
    flags = client_flags(pki, cert=mutual)
    async with server_process(pki, tmp_path, mutual=mutual) as url:
        with (tmp_path / "cloud.log").open("wb") as cloud_log:
            cloud = await anyio.open_process(
                [*SLMOPS, "--log-json", "cloud", "--nats", url, *flags, "--state", str(tmp_path / "cloud"),
                 "--fleet", fleet, "--no-rollouts"],
                stdout=subprocess.DEVNULL, stderr=cloud_log,
            )  # fmt: skip
        await wait_until(
            lambda: b"cloud_active" in (tmp_path / "cloud.log").read_bytes(), timeout=60, what="cloud active"
        )
        http = free_port()
        tls_env = {"SLMOPS_TLS_CA": str(pki.ca)}
        if mutual:
            tls_env |= {"SLMOPS_TLS_CERT": str(pki.client_cert), "SLMOPS_TLS_KEY": str(pki.client_key)}
        try:
            async with aiohttp.ClientSession() as session:
                client = Client(session, f"http://127.0.0.1:{http}")
                edge = await start_edge(
                    [*SLMOPS, "--log-json", "edge", "--nats", url, "--fleet", fleet, "--node", "n1",
                     "--data", str(tmp_path / "edge"), "--model", str(bundle.path), "--trust", str(pub),
                     "--http", f"127.0.0.1:{http}"],
                    tmp_path / "edge.log", client, env=tls_env,
                )  # fmt: skip
                try:
                    await client.predict(["alpha one", "beta two"])

                    doc: dict[str, object] = {}

                    async def node_online() -> bool:
                        nonlocal doc
                        out = await anyio.run_process(
                            [*SLMOPS, "fleet", "status", "--json", "--nats", url, *flags, "--fleet", fleet],
                            check=False,
                        )
                        err = out.stderr.decode()
                        if out.returncode != 0 and "no such fleet" in err:
                            return False  # the cloud has not recorded the node's first report yet
                        if out.returncode != 0:
                            raise AssertionError(err + out.stdout.decode())
                        # nothing else on stderr: asyncio's TLS eof notice is filtered (shared/logging.py)
                        assert "eof_received" not in err, err
                        doc = json.loads(out.stdout)
                        nodes = doc.get("nodes")  # with --fleet: that fleet's nodes
                        assert isinstance(nodes, list), doc
                        return any(n["node"] == "n1" and n["online"] for n in nodes)

                    try:
                        await wait_until(node_online, timeout=60, interval=0.5, what="node online")
                    except TimeoutError:
                        raise AssertionError(f"fleet status never showed n1 online: {doc}") from None
                    log = (tmp_path / "edge.log").read_text()
                    assert '"new":"online"' in log, log[-3000:]
                finally:
                    edge.send_signal(signal.SIGTERM)
                    with anyio.fail_after(30):
                        assert await edge.wait() == 0
        finally:
            cloud.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                assert await cloud.wait() == 0, (tmp_path / "cloud.log").read_text()[-3000:]


async def test_a_wrong_ca_fails_a_command_at_once_naming_the_certificate_problem(pki: Pki) -> None:
    """A one-shot command given the wrong CA exits 1 within seconds with one line saying the
    server's certificate does not verify against that CA file (no traceback, no hang)."""
    with tls_server(pki, mutual=False) as srv:
        with anyio.fail_after(30):
            out = await anyio.run_process(
                [*SLMOPS, "models", "list", "--nats", srv.url, "--tls-ca", str(pki.other_ca)], check=False
            )
    err = out.stderr.decode()
    assert out.returncode == 1, err
    assert "Traceback" not in err
    assert "does not verify against --tls-ca" in err, err
    assert "other-ca.pem" in err, err
    assert "unable to get local issuer certificate" in err, err


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("none", "give --tls-cert and --tls-key"),
        ("stranger", "our client certificate"),
    ],
)
async def test_mutual_tls_refuses_a_missing_or_foreign_client_certificate_saying_which(
    pki: Pki, given: str, expected: str
) -> None:
    """Under mutual TLS, no client certificate, or one from another CA, is refused; the error
    says which of the two happened."""
    opts = (
        ConnectOptions(tls_ca=pki.ca)
        if given == "none"
        else ConnectOptions(tls_ca=pki.ca, tls_cert=pki.stranger_cert, tls_key=pki.stranger_key)
    )
    with tls_server(pki, mutual=True) as srv:
        with pytest.raises(NatsUnavailable, match=re.escape(expected)):
            await connect_once(srv.url, options=opts)
        nc = await connect_once(
            srv.url, options=ConnectOptions(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        )
        await nc.close()


async def test_tls_files_refuse_a_plain_text_server(pki: Pki, nats_server: EmbeddedServer) -> None:
    """nats-py would go on in plain text with a server that does not offer TLS; given TLS
    files, slmops refuses it (a downgrade is not silently accepted)."""
    with pytest.raises(NatsUnavailable, match="answered in plain text, not TLS"):
        await connect_once(nats_server.url, options=ConnectOptions(tls_ca=pki.ca))


async def test_a_tls_client_sends_no_connect_and_no_password_to_a_plain_text_server(pki: Pki) -> None:
    """A man in the middle posing as a plain-text NATS server (it sends INFO, asks for auth,
    never starts TLS) receives the client's TLS hello and nothing else: no CONNECT, so not
    the URL's password (nats-py's tls_handshake_first; before, CONNECT went out first)."""
    received = bytearray()
    closed = anyio.Event()
    info = b'INFO {"server_id":"mitm","version":"2.10.0","auth_required":true,"max_payload":1048576}\r\n'

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(info)
            with anyio.move_on_after(30):
                try:
                    while True:
                        received.extend(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
        closed.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        url = f"nats://alice:s3cret-pw@127.0.0.1:{port}"
        with pytest.raises(NatsUnavailable, match="no TLS handshake completed"):
            await connect_once(url, options=ConnectOptions(tls_ca=pki.ca))
        with anyio.fail_after(30):
            await closed.wait()
        tg.cancel_scope.cancel()
    assert received[:1] == b"\x16", bytes(received[:64])  # a TLS handshake record: the hello
    assert b"CONNECT" not in received
    assert b"s3cret-pw" not in received


async def test_a_node_with_the_wrong_ca_stays_offline_and_says_why(pki: Pki) -> None:
    """The long-running link (edge, cloud) never connects with a wrong CA: it stays offline,
    retrying, and its last error names the certificate problem at once."""
    with tls_server(pki, mutual=False) as srv:
        async with Link(srv.url, fleet="f1", node="n1", options=ConnectOptions(tls_ca=pki.other_ca)) as link:

            async def failed() -> bool:
                return link.statistics().attempts >= 1

            await wait_until(failed, timeout=30)
            assert link.state is not LinkState.ONLINE
            last = link.statistics().last_error or ""
            assert "does not verify against --tls-ca" in last, last
        async with Link(srv.url, fleet="f1", node="n1", options=ConnectOptions(tls_ca=pki.ca)) as link:
            await link.wait_online(30)


def test_tls_usage_errors_name_the_flag(pki: Pki, tmp_path: Path) -> None:
    """A client cert without its key, a file that is not PEM, and server TLS halves are usage
    errors (exit 2) naming the flag."""
    runner = CliRunner()
    res = runner.invoke(main, ["models", "list", "--tls-cert", str(pki.client_cert)])
    assert res.exit_code == 2, res.output
    assert "--tls-key" in res.output, res.output
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    res = runner.invoke(main, ["models", "list", "--nats", "nats://127.0.0.1:1", "--tls-ca", str(junk)])
    assert res.exit_code == 1, res.output
    assert "--tls-ca" in res.output, res.output
    assert "not a PEM file" in res.output, res.output
    res = runner.invoke(main, ["server", "--tls-cert", str(pki.server_cert)])
    assert res.exit_code == 2, res.output
    assert "--tls-key" in res.output, res.output
    res = runner.invoke(main, ["server", "--tls-ca", str(pki.ca)])
    assert res.exit_code == 2, res.output
    assert "--tls-cert" in res.output, res.output
    res = runner.invoke(main, ["server", "--tls-cert", str(junk), "--tls-key", str(pki.server_key)])
    assert res.exit_code == 2, res.output
    assert "not a PEM file" in res.output, res.output


def test_every_networked_command_offers_the_tls_flags() -> None:
    """Each command with --nats also has --tls-ca, --tls-cert and --tls-key."""
    import click

    def walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")

    checked = 0
    for path, cmd in walk(main, "slmops"):
        names = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
        if "--nats" in names:
            checked += 1
            assert {"--tls-ca", "--tls-cert", "--tls-key"} <= names, path
    assert checked >= 15, checked
    assert os.environ.get("SLMOPS_TLS_CA") is None  # the suite itself runs without TLS
