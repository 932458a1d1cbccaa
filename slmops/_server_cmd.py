"""``slmops server``: the embedded nats-server in the foreground, provisioned for slmops."""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

import anyio
import click

from slmops.shared.connect import connect_attempt, connect_once
from slmops.shared.connopts import ConnectOptions
from slmops.shared.errors import PortUnavailable, ServerStartError, SlmopsError
from slmops.shared.jetstream import is_nats_error
from slmops.shared.logging import get_logger
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer, ServerTls

__all__ = ["check_port_free", "serve"]

log = get_logger("slmops.server")


def check_port_free(host: str, port: int, option: str) -> None:
    """Raise ``PortUnavailable`` naming ``option`` when something listens on ``host:port``.

    Binds as nats-server does (``SO_REUSEADDR``, so a socket in TIME_WAIT is no obstacle) and
    lets go at once. Port 0 or -1 (any free port) always passes."""
    if port <= 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(host, port, option, f"cannot resolve {host!r}: {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
                sock.listen(1)
            except OSError as exc:
                reason = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc.strerror)
                raise PortUnavailable(host, port, option, reason) from exc


def _self_context(tls: ServerTls) -> ssl.SSLContext:
    """A client context for the server's own provisioning connection: it trusts exactly the
    server's certificate (a partial chain: the leaf is the anchor, so no hostname or CA is
    needed) and, under mutual TLS, presents that same certificate as its client identity."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False  # the pinned certificate is the whole trust decision
    ctx.load_verify_locations(cafile=str(tls.cert))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if tls.verify_ca is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


async def _provision(srv: EmbeddedServer, creds: Path | None = None) -> None:
    """Create the slmops streams and buckets on the fresh server (what ``slmops cloud`` would
    do on its first start, so nodes can report before a cloud runs); in operator mode as the
    fleet's cloud user (``creds``)."""
    creds_options = {} if creds is None else {"user_credentials": str(creds)}
    if srv.tls is None:
        nc = await connect_once(
            srv.url, timeout=5.0, name="slmops-server-provision", options=ConnectOptions(nats_creds=creds)
        )
    else:
        try:
            with anyio.fail_after(5):
                nc = await connect_attempt(
                    srv.url, name="slmops-server-provision", allow_reconnect=False,
                    tls=_self_context(srv.tls), tls_handshake_first=True, require_tls=True, **creds_options,
                )  # fmt: skip
        except (ssl.SSLError, TimeoutError, SlmopsError) as exc:
            _skip_provision(exc)
            return
        except Exception as exc:
            if not is_nats_error(exc):
                raise
            _skip_provision(exc)
            return
    try:
        await ensure_resources(nc.jetstream())
    finally:
        await nc.close()


def _skip_provision(exc: BaseException) -> None:
    # Under mutual TLS the server's certificate may not be usable as a client certificate
    # (no clientAuth usage): the cloud provisions on its first start instead.
    log.warning(
        "server_provision_skipped",
        reason=f"{type(exc).__name__}: {exc}",
        note="the server's own certificate was refused as a client; `slmops cloud` creates the streams",
    )


async def serve(
    host: str, port: int, store: Path | None, tls: ServerTls | None = None, auth: Path | None = None
) -> None:
    """Check the port (before touching ``store``), start the server (with ``tls``: TLS on
    the client port, mutual TLS when it names a CA), provision it, run until cancelled.
    Raises ``ServerStartError`` (a taken port among them), or ``SlmopsError`` when the server
    exits on its own. ``auth``: a fleet directory (``slmops fleet init``): the server runs in
    operator mode with its ``server.conf`` (per-device JWT identities, full resolver)."""
    creds, extra = None, []
    if auth is not None:
        from slmops.cloud.trust import FleetDir

        fleet_dir = FleetDir(auth)  # FleetDirError (a ValueError) for anything else
        creds, extra = fleet_dir.cloud_creds, ["-c", str(fleet_dir.server_conf)]
    try:
        check_port_free(host, port, "--port")
    except PortUnavailable as exc:
        raise ServerStartError(str(exc)) from exc
    srv = EmbeddedServer(host=host, port=port, store_dir=store, tls=tls, extra_args=extra)
    await srv.start_async()
    try:
        await _provision(srv, creds)
        click.echo(f"nats-server ready at {srv.url}  (JetStream store: {srv.store_dir})", err=False)
        click.echo("Ctrl-C or SIGTERM stops it.", err=True)
        log.info("server_ready", url=srv.url, store=str(srv.store_dir))
        while srv.running:  # noqa: ASYNC110 -- polls a child process, no event to await
            await anyio.sleep(0.5)
        log.error("server_exited", output=srv.output()[-2000:])
        raise SlmopsError("nats-server exited on its own (its output is in the log above)")
    finally:
        with anyio.CancelScope(shield=True):
            await srv.stop_async(keep_store=store is not None)
