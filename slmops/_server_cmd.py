"""``slmops server``: the embedded nats-server in the foreground, provisioned for slmops."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import anyio
import click

from slmops.shared.connect import connect_once
from slmops.shared.errors import PortUnavailable, ServerStartError, SlmopsError
from slmops.shared.logging import get_logger
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

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


async def serve(host: str, port: int, store: Path | None) -> None:
    """Check the port (before touching ``store``), start the server, provision it, run until
    cancelled. Raises ``ServerStartError`` (a taken port among them), or ``SlmopsError`` when
    the server exits on its own."""
    try:
        check_port_free(host, port, "--port")
    except PortUnavailable as exc:
        raise ServerStartError(str(exc)) from exc
    srv = EmbeddedServer(host=host, port=port, store_dir=store)
    await srv.start_async()
    try:
        nc = await connect_once(srv.url, timeout=5.0, name="slmops-server-provision")
        try:
            await ensure_resources(nc.jetstream())
        finally:
            await nc.close()
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
