"""``slmops server``: the embedded nats-server in the foreground, provisioned for slmops."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import click

from slmops.shared.connect import connect_once
from slmops.shared.errors import SlmopsError
from slmops.shared.logging import get_logger
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

log = get_logger("slmops.server")


async def _serve(host: str, port: int, store: Path | None) -> int:
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
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def watch_process() -> None:
                    while srv.running:  # noqa: ASYNC110 -- polls a child process, no event to await
                        await anyio.sleep(0.5)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_process)
                async for signum in signals:
                    log.info("server_stopping", signal=signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    break
        if not srv.running:
            log.error("server_exited", output=srv.output()[-2000:])
            return 1
        return 0
    finally:
        await srv.stop_async(keep_store=store is not None)


def run_server(*, host: str, port: int, store: Path | None) -> int:
    """Run until a signal; returns the exit code (1 if the server died on its own)."""
    try:
        return anyio.run(_serve, host, port, store)
    except SlmopsError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
