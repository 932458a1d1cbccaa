"""``slmops fleet status``, ``slmops fleet forget`` and ``slmops status``: parsing and output
only; the reads are in ``cloud.ingest.overview`` (online judged by the server's clock)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click

from slmops.cli_common import fleet_id, nats_option, run, table_line

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from slmops.cloud.ingest.overview import NodeView

__all__ = ["fleet", "status"]

T = TypeVar("T")


@asynccontextmanager
async def _connected(url: str) -> AsyncIterator[NATS]:
    from slmops.shared.connect import connect_once

    nc = await connect_once(url)
    try:
        yield nc
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()


def _with_nats(url: str, read: Callable[[NATS], Awaitable[T]]) -> T:
    async def main() -> T:
        async with _connected(url) as nc:
            return await read(nc)

    return run(main)


@click.group("fleet")
def fleet() -> None:
    """The fleet as the cloud sees it."""


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = seconds
    return f"{s:.0f}s ago" if s < 120 else (f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago")


def _node_row(v: NodeView) -> list[str]:
    n = v.snapshot
    model = f"{n.model} v{n.model_version} {n.variant}" if n.model else "-"
    return [
        n.fleet, n.node, "online" if v.online else "offline", model, _ago(v.silent_s), str(n.inferences),
        str(n.windows), str(n.seq_high), str(n.missing_seqs), str(n.duplicates), str(n.outbox_depth),
        f"{n.dropped_inferences}/{n.dropped_aggregates}", n.device or n.arch or "-",
        "; ".join(n.notes) or "-",
    ]  # fmt: skip


_NODE_HEADER = ["fleet", "node", "state", "model", "last seen", "inferences", "windows", "seq", "missing",
                "dups", "outbox", "dropped", "device", "notes"]  # fmt: skip
_NODE_WIDTHS = [14, 16, 7, 16, 9, 10, 7, 6, 7, 5, 6, 7, 14, 0]


@fleet.command("status")
@nats_option
@click.option("--fleet", "fleet_id", default=None, callback=fleet_id, help="Only this fleet.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='JSON: {"nodes": [{"node", "online", "model_version", ...}]}, every node, streamed.',
)
@click.option("--page", type=click.IntRange(1), default=1, show_default=True, help="Table: which page.")
@click.option(
    "--page-size", type=click.IntRange(1, 10_000), default=100, show_default=True, help="Table: nodes a page."
)
def fleet_status_cmd(nats_url: str, fleet_id: str | None, as_json: bool, page: int, page_size: int) -> None:
    """Per node: online or offline (the server heard from it within 120 s, by the server's
    clock), model, last seen, inferences counted exactly once, windows, seq high-water mark and
    missing seqs, duplicates dropped, outbox depth and drops from status reports.

    Read from KV slmops_fleet, which the active cloud instance keeps up to date (within about
    a second); works while the cloud is down, showing its last state. Forgotten nodes
    (`fleet forget`) are left out until they send again. The table shows one page of nodes
    (sorted by fleet and node; --page, --page-size; a page past the last is an error); --json
    writes every node, streamed as they are read (in the order the bucket delivers them, not
    sorted)."""
    from slmops.cloud.ingest.overview import node_keys, read_views, server_time, stream_views
    from slmops.cloud.ingest.presence import forgotten

    async def main() -> None:
        async with _connected(nats_url) as nc:
            keys = await node_keys(nc, fleet_id)
            if fleet_id and not keys:
                known = sorted({k.split(".", 1)[0] for k in await node_keys(nc, None)})
                seen = f"fleets it knows: {', '.join(known)}" if known else "it knows no fleet yet"
                raise click.ClickException(
                    f"no such fleet {fleet_id!r}: the cloud has no node of it ({seen})"
                )
            now, clock = await server_time(nc)
            gone = await forgotten(nc.jetstream(), fleet_id)
            if as_json:
                await _stream_json(stream_views(nc, keys, now, gone), now, clock)
                return
            pages = -(-len(keys) // page_size)
            if page > max(pages, 1):
                raise click.ClickException(
                    f"page {page} is past the last page ({pages} page{'s' if pages != 1 else ''} "
                    f"at --page-size {page_size})"
                )
            first = (page - 1) * page_size
            views = await read_views(nc, keys[first : first + page_size], now, gone)
            _print_page(views, clock, first, len(keys), page, page_size)

    run(main)


async def _stream_json(views: AsyncGenerator[NodeView], now: datetime, clock: str) -> None:
    """``{"server_time", "clock", "nodes": [...]}``, written node by node as they are read."""
    import msgspec

    head = f'{{"server_time": {json.dumps(now.isoformat())}, "clock": {json.dumps(clock)}, "nodes": ['
    click.echo(head, nl=False)
    sep = "\n"
    # aclosing: a reader gone early (`| head`) stops the watch here, while the connection is open.
    async with aclosing(views):
        async for v in views:
            doc = {**msgspec.to_builtins(v.snapshot), "online": v.online, "silent_s": v.silent_s}
            click.echo(sep + json.dumps(doc), nl=False)
            sep = ",\n"
    click.echo("]}" if sep == "\n" else "\n]}")


def _print_page(views: list[NodeView], clock: str, first: int, total: int, page: int, size: int) -> None:
    click.echo(table_line(_NODE_HEADER, _NODE_WIDTHS))
    for v in views:
        click.echo(table_line(_node_row(v), _NODE_WIDTHS))
        if v.snapshot.cannot_run:
            click.echo(f"  cannot run: {v.snapshot.cannot_run}")
    if not total:
        click.echo("(no nodes: has the cloud service run against this NATS?)", err=True)
    elif first + size < total:
        click.echo(
            f"(nodes {first + 1}-{first + size} of {total}: --page {page + 1} for more, --json for all)"
        )
    if clock != "server":
        click.echo("(online judged by this machine's clock: the server gave no time)", err=True)


@fleet.command("forget")
@nats_option
@click.option("--fleet", "fleet_id", required=True, callback=fleet_id, help="The node's fleet.")
@click.option("--node", required=True, help="The retired node's id.")
@click.option("--force", is_flag=True, help="Forget it even though it is online.")
def forget(nats_url: str, fleet_id: str, node: str, force: bool) -> None:
    """Hide a retired node from `fleet status` and `slmops status`.

    The cloud keeps everything it knows of the node (counts, seq high-water marks, install
    ids), so if the node ever sends again it reappears and nothing it sent is counted twice.
    Refused while the node is online (unless --force)."""
    from slmops.cloud.ingest.overview import forget_node

    record = _with_nats(nats_url, lambda nc: forget_node(nc, fleet_id, node, force=force))
    seen = record.last_seen.isoformat() if record.last_seen else "never"
    click.echo(f"forgot {fleet_id}/{node} (last seen {seen}); it reappears if it sends again")


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


@click.command("status")
@nats_option
@click.option("--fleet", "fleet_id", default=None, callback=fleet_id, help="Only this fleet.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def status(nats_url: str, fleet_id: str | None, as_json: bool) -> None:
    """The whole system at a glance: is NATS reachable, which cloud instance holds the lease,
    and per fleet: nodes online (of those not forgotten), assigned versions, open drift events,
    running rollouts. Exits 1 when NATS is unreachable or refuses these credentials (saying so,
    also with --json)."""
    from slmops.shared.connect import redact_url
    from slmops.shared.errors import NatsUnavailable, PermissionDenied

    try:
        doc = _with_nats(nats_url, lambda nc: _overview(nc, nats_url, fleet_id))
    except click.ClickException as exc:
        denied = isinstance(exc.__cause__, PermissionDenied)
        if not (denied or isinstance(exc.__cause__, NatsUnavailable)):
            raise
        if as_json:
            nats = {"url": redact_url(nats_url), "reachable": denied, "error": exc.message}
            click.echo(json.dumps({"nats": nats}))
        elif not denied:
            click.echo(f"nats     {redact_url(nats_url)}: unreachable")
        raise
    if as_json:
        click.echo(json.dumps(doc))
        return
    _print_overview(doc)


async def _overview(nc: NATS, url: str, fleet: str | None) -> dict[str, Any]:
    from slmops.cloud.ingest import overview as ov
    from slmops.shared.connect import redact_url

    js = nc.jetstream()  # a read: nothing is created (each read takes a missing resource as empty)
    views, now, clock = await ov.fleet_view(nc, fleet)
    holders = await ov.lease_holders(js)
    fleets: dict[str, dict[str, Any]] = {}

    def of(name: str) -> dict[str, Any]:
        return fleets.setdefault(
            name, {"nodes": 0, "online": 0, "assigned": [], "open_drift": [], "rollouts": []}
        )

    for v in views:
        f = of(v.snapshot.fleet)
        f["nodes"] += 1
        f["online"] += v.online
    for a in await ov.assignments(js, fleet):
        of(a.fleet)["assigned"].append(
            {
                "node": a.node,
                "model": a.model,
                "version": a.version,
                "variant": a.variant,
                "rollout": a.rollout,
            }
        )
    for e in await ov.open_drift_events(nc, fleet):
        of(e.fleet)["open_drift"].append(
            {"id": e.id, "scope": e.scope, "node": e.node, "signal": e.signal, "severity": e.severity,
             "model": f"{e.model.name} v{e.model.version}", "opened": _iso(e.time), "summary": e.summary}
        )  # fmt: skip
    for r in await ov.active_rollouts(js, url):
        if fleet is None or r.fleet == fleet:
            of(r.fleet)["rollouts"].append(
                {"id": r.id, "model": r.model, "from": r.previous_version, "to": r.version,
                 "status": r.status, "phase": r.phase, "stage": r.stage + 1,
                 "stages": len(r.config.stages), "percent": r.percent}
            )  # fmt: skip
    return {
        "nats": {"url": redact_url(url), "reachable": True, "server_time": now.isoformat(), "clock": clock},
        "cloud": {"leases": holders, "active": bool(holders)},
        "fleets": dict(sorted(fleets.items())),
    }


def _print_overview(doc: dict[str, Any]) -> None:
    click.echo(f"nats     {doc['nats']['url']}: reachable (server time {doc['nats']['server_time'][:19]}Z)")
    leases = doc["cloud"]["leases"]
    if not leases:
        click.echo("cloud    no instance holds the lease: no cloud is active")
    for key, holder in leases.items():
        click.echo(f"cloud    {holder} holds lease {key!r}")
    if not doc["fleets"]:
        click.echo("fleets   none yet (no node has reported, nothing assigned)")
    for name, f in doc["fleets"].items():
        click.echo(f"fleet    {name}: {f['online']} of {f['nodes']} nodes online")
        for a in f["assigned"]:
            who = f"node {a['node']}" if a["node"] else "fleet-wide"
            via = f" (rollout {a['rollout']})" if a["rollout"] else ""
            click.echo(
                f"  assigned   {who}: {a['model']} v{a['version']} {a['variant'] or ''}".rstrip() + via
            )
        if not f["assigned"]:
            click.echo("  assigned   nothing")
        for e in f["open_drift"]:
            where = e["node"] or "fleet"
            click.echo(
                f"  drift open {e['signal']} ({where}, {e['model']}, {e['severity']}): "
                f"{e['summary'] or e['id']}"
            )
        if not f["open_drift"]:
            click.echo("  drift open none")
        for r in f["rollouts"]:
            click.echo(
                f"  rollout    {r['id']}: {r['model']} v{r['from']} → v{r['to']} {r['status']}/{r['phase']}, "
                f"stage {r['stage']}/{r['stages']} ({r['percent']}%)"
            )
        if not f["rollouts"]:
            click.echo("  rollout    none running")
