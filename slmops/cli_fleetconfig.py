"""``slmops fleet config apply|show|history|rollback`` and ``slmops audit``: parsing and
output only (``cloud.fleetconfig.client``, ``cloud.audit``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec

from slmops.cli_common import call, fleet_id, jetstream, nats_option, run, signing_key_option, table_line

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = ["audit", "config"]

T = TypeVar("T")


def _with_js(url: str, fn: Callable[[JetStreamContext], Awaitable[T]], *, provision: bool = True) -> T | None:
    """Run ``fn`` on a fresh JetStream context; ``provision=False`` for reads (they create
    nothing on the server and take a missing bucket or stream as empty)."""

    async def main() -> T:
        async with jetstream(url, provision=provision) as js:
            return await fn(js)

    return run(main)


def _stages(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int]:
    if not value:
        return []
    try:
        return [int(p) for p in value.split(",")]
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: comma-separated percentages, e.g. 10,50,100") from exc


def _soak(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    from slmops.shared.config import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _check_settings(fleet: str, schema: int, settings: dict[str, Any]) -> None:
    """Refuse what a node of this build would refuse, before anything is published."""
    from slmops.edge.config import EdgeConfig
    from slmops.edge.fleetconfig import resolve
    from slmops.shared.fleetconfig import ConfigRejected

    try:
        resolve(EdgeConfig(fleet=fleet, node="check", data_dir="."), settings, schema=schema)
    except ConfigRejected as exc:
        raise click.UsageError(f"a node would refuse this configuration: {exc.reason}") from exc


_target_options = [
    click.option("--fleet", "fleet", required=True, callback=fleet_id, help="The fleet."),
    click.option(
        "--nodes",
        default="",
        help="Only these nodes: ids or patterns, comma-separated (till-*). Default: all.",
    ),
    click.option(
        "--stages",
        default=None,
        callback=_stages,
        help="Stage it: cumulative percentages of the nodes, e.g. 10,50,100; each stage waits for its "
        "nodes to report the version applied and healthy for --soak. Default: all at once.",
    ),
    click.option(
        "--soak", default="0s", callback=_soak, show_default=True, help="Time applied and healthy per stage."
    ),
]


def _targets(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_target_options):
        f = option(f)
    return f


def _send(url: str, request_of: Callable[[JetStreamContext], Awaitable[Any]]) -> None:
    from slmops.cloud.fleetconfig.client import send_change
    from slmops.shared.connect import connect_once
    from slmops.shared.provision import ensure_resources

    async def main() -> Any:
        nc = await connect_once(url, timeout=5.0, name="slmops-cli")
        try:
            js = nc.jetstream()
            await ensure_resources(js)
            return await send_change(nc, await request_of(js))
        finally:
            await nc.close()

    reply = run(main)
    if reply is not None:
        nodes = f" (nodes now: {', '.join(reply.nodes)})" if reply.nodes else ""
        click.echo(f"version {reply.version} published{nodes}; audit record {reply.audit_id}")
        for note in reply.notes:
            click.echo(f"  note: {note}")


@click.group("config")
def config() -> None:
    """Fleet configuration: signed, versioned edge settings (window, min count, DP, outbox and
    safety limits, refresh timings, log level, NATS URL) pushed to nodes through KV."""


@config.command("apply")
@nats_option
@_targets
@signing_key_option
@click.option("--note", default="", help="Why (kept with the version and in the audit record).")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def apply_cmd(
    nats_url: str,
    fleet: str,
    nodes: str,
    stages: list[int],
    soak: float,
    key_path: Path,
    note: str,
    file: Path,
) -> None:
    """Publish FILE.toml as the fleet's next configuration version (through the cloud)."""
    from slmops.cloud.fleetconfig.client import propose
    from slmops.shared.audit import ChangeRequest
    from slmops.shared.bundle import load_private_key
    from slmops.shared.fleetconfig import load_settings

    schema, settings = call(lambda: load_settings(file))
    _check_settings(fleet, schema, settings)
    key = call(lambda: load_private_key(key_path))

    async def request(js: JetStreamContext) -> ChangeRequest:
        raw = await propose(js, fleet, settings, key, schema=schema, note=note)
        return ChangeRequest(
            action="config.apply", fleet=fleet, document=raw.decode(), nodes=nodes, stages=stages, soak_s=soak
        )

    _send(nats_url, request)


@config.command("rollback")
@nats_option
@_targets
@signing_key_option
@click.option("--to", "to", required=True, type=int, help="The version whose settings to go back to.")
def rollback_cmd(
    nats_url: str, fleet: str, nodes: str, stages: list[int], soak: float, key_path: Path, to: int
) -> None:
    """Publish a new version carrying version --to's settings (versions only ever grow)."""
    from slmops.cloud.fleetconfig.client import rollback_document
    from slmops.shared.audit import ChangeRequest
    from slmops.shared.bundle import load_private_key

    key = call(lambda: load_private_key(key_path))

    async def request(js: JetStreamContext) -> ChangeRequest:
        raw = await rollback_document(js, fleet, to, key)
        return ChangeRequest(
            action="config.rollback",
            fleet=fleet,
            document=raw.decode(),
            nodes=nodes,
            stages=stages,
            soak_s=soak,
        )

    _send(nats_url, request)


@config.command("show")
@nats_option
@click.option("--fleet", "fleet", required=True, callback=fleet_id, help="The fleet.")
@click.option("--json", "as_json", is_flag=True, help='JSON: {"keys": {"_fleet"|node: doc}, "rollout": ...}.')
def show_cmd(nats_url: str, fleet: str, as_json: bool) -> None:
    """What the fleet's keys hold now (fleet-wide and per node), each node's last report of
    its configuration, and a staged rollout's state."""
    from slmops.cloud.fleetconfig.store import ConfigStore
    from slmops.shared.errors import NotFound
    from slmops.shared.jetstream import nats_errors

    async def read(js: JetStreamContext) -> dict[str, Any]:
        try:
            store = await ConfigStore(js, url=nats_url).open()
        except NotFound:  # nothing was ever pushed to this server
            return {"keys": {}, "rollout": None, "nodes": {}}
        keys = {k: json.loads(v) for k, v in (await store.current(fleet)).items()}
        entry = None
        try:
            with nats_errors("kv key", f"{fleet}._rollout", nats_url):
                got = await store.kv.get(f"{fleet}._rollout")
            entry = json.loads(got.value) if got.value else None
        except NotFound:  # no rollout (or a deleted one)
            entry = None
        nodes = {}
        for node in await store.known_nodes(fleet):
            st = await store.last_status(fleet, node)
            if st is not None:
                nodes[node] = {
                    "config_version": st.config_version, "seen": st.config_seen, "state": st.config_state,
                    "reason": st.config_reason, "warnings": st.config_warnings,
                }  # fmt: skip
        return {"keys": keys, "rollout": entry, "nodes": nodes}

    out = _with_js(nats_url, read, provision=False)
    if out is None:
        return
    if as_json:
        click.echo(json.dumps(out))
        return
    for token, doc in sorted(out["keys"].items()):
        who = "fleet-wide" if token == "_fleet" else f"node {token}"
        click.echo(f"{who}: v{doc.get('version')} {json.dumps(doc.get('settings'), sort_keys=True)}")
    if not out["keys"]:
        click.echo(f"fleet {fleet}: no configuration pushed (nodes run their own settings)")
    if out["rollout"]:
        r = out["rollout"]
        click.echo(
            f"rollout v{r['version']}: {r['status']} stage {r['stage'] + 1}/{len(r['stages'])} {r['reason']}"
        )
    for node, st in sorted(out["nodes"].items()):
        reason = f" ({st['reason']})" if st["reason"] else ""
        if st["seen"] is None and st["config_version"] is None:
            click.echo(f"  {node}: has reported no pushed configuration yet")
            continue
        in_effect = "none" if st["config_version"] is None else f"v{st['config_version']}"
        seen = "none" if st["seen"] is None else f"v{st['seen']}"
        click.echo(f"  {node}: in effect {in_effect}, last seen {seen} {st['state']}{reason}")


@config.command("history")
@nats_option
@click.option("--fleet", "fleet", required=True, callback=fleet_id, help="The fleet.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line.")
def history_cmd(nats_url: str, fleet: str, as_json: bool) -> None:
    """Every version published for the fleet, oldest first."""
    from slmops.cloud.fleetconfig.client import history

    docs = _with_js(nats_url, lambda js: history(js, fleet), provision=False) or []
    for d in docs:
        if as_json:
            click.echo(msgspec.json.encode(d).decode())
        else:
            when = d.created.isoformat() if d.created else "-"
            note = f"  ({d.note})" if d.note else ""
            click.echo(f"v{d.version}  {when}  {json.dumps(d.settings, sort_keys=True)}{note}")


@click.command("audit")
@nats_option
@click.option(
    "--fleet", "fleet", default=None, callback=fleet_id, help="Only this fleet (and global changes)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
def audit(nats_url: str, fleet: str | None, as_json: bool) -> None:
    """Who changed what, when: the audit stream, oldest first. "who" is the identity the NATS
    server authenticated (or "unauthenticated"), never one a client wrote."""
    from slmops.cloud.audit import read_audit

    records = _with_js(nats_url, lambda js: read_audit(js, fleet, url=nats_url), provision=False) or []
    widths = [20, 18, 16, 14, 24, 0]
    if not as_json:
        click.echo(table_line(["time", "who", "action", "fleet", "target", "detail"], widths))
    for r in records:
        if as_json:
            click.echo(msgspec.json.encode(r).decode())
            continue
        detail = r.reason if not r.ok else f"v{r.detail.get('version')}" if "version" in r.detail else ""
        row = [r.time.strftime("%Y-%m-%d %H:%M:%S"), r.who, r.action + ("" if r.ok else " REFUSED"),
               r.fleet or "-", r.target or "-", detail or ""]  # fmt: skip
        click.echo(table_line(row, widths))
