"""``slmops fleet init|enroll|revoke|push``: per-device NATS identities (issue 17). Parsing
and output only; the work is in ``cloud.trust``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from slmops.cli_common import call, fleet_id, nats_option, run

__all__ = ["enroll", "init", "push", "revoke", "server_config"]

_ROLES = ("node", "cloud", "operator", "analyst")
F = TypeVar("F", bound=Callable[..., Any])

auth_dir_option = click.option(
    "--auth",
    "auth_dir",
    envvar="SLMOPS_AUTH_DIR",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The fleet directory `slmops fleet init` made. Env: SLMOPS_AUTH_DIR.",
)


def _node_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    from slmops.shared.names import validate_id

    try:
        return validate_id(value, "node") if value is not None else None
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--operator-name", default="slmops", show_default=True, help="The operator JWT's name.")
def init(directory: Path, operator_name: str) -> None:
    """Create a fleet's NATS identities in DIRECTORY (new or empty): an operator, the SLMOPS
    account (cloud, nodes, analysts) and the OPERATOR account (operators' tools, which reach
    the cloud's change service through an import that makes the server name them in the
    audit), each with a signing key, the system account with a user for claim updates, the
    cloud's creds, cloud.toml (`slmops cloud --config`: those creds and audit_accounts =
    [OPERATOR]), and server.conf (a full resolver) for `slmops server --auth DIRECTORY` or
    any nats-server's config (`include`).

    DIRECTORY holds the seeds: keep it on the operator's machine, mode 0700."""
    from slmops.cloud.trust import FleetDir

    d = call(lambda: FleetDir.init(directory, operator_name=operator_name))
    click.echo(f"fleet identities in {d.path}")
    click.echo(f"  operator        {d.operator_public}")
    click.echo(f"  account SLMOPS  {d.account_public}")
    click.echo(f"  account OPERATOR {d.operator_account_public}")
    click.echo(f"  system account  {d.system_account_public}")
    click.echo(f"  server config   {d.server_conf}   (slmops server --auth {d.path})")
    click.echo(f"  cloud creds     {d.cloud_creds}")
    click.echo(f"  cloud config    {d.cloud_toml}   (slmops cloud --config ...)")
    click.echo(f"next: slmops fleet enroll --auth {d.path} --fleet FLEET --node NODE")
    click.echo(f"      slmops fleet enroll --auth {d.path} --role operator --name YOU")


def _fleet_node_options(fleet_help: str, node_help: str) -> Callable[[F], F]:
    """``--auth DIR``, ``--fleet`` and ``--node`` (validated ids)."""

    def decorate(f: F) -> F:
        f = click.option("--node", callback=_node_id, help=node_help)(f)
        f = click.option("--fleet", callback=fleet_id, help=fleet_help)(f)
        return auth_dir_option(f)

    return decorate


@click.command("enroll")
@_fleet_node_options("The node's fleet (role node; optional for analyst).", "The node's id (role node).")
@click.option(
    "--role", type=click.Choice(_ROLES), default="node", show_default=True, help="What the user may do."
)
@click.option("--name", help="A name for a cloud, operator or analyst user (default: the role).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the creds file (default: DIR/creds/nodes/FLEET/NODE.creds, "
    "or DIR/creds/ROLE-NAME.creds).",
)
@click.option(
    "--js-domain",
    help="For a node at a leaf site: the hub's JetStream domain (its edge runs with --js-domain too).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Enroll again where the creds file exists: a new key, the file overwritten (the old "
    "creds stay valid until `slmops fleet revoke`).",
)
def enroll(
    auth_dir: Path,
    fleet: str | None,
    node: str | None,
    role: str,
    name: str | None,
    out: Path | None,
    js_domain: str | None,
    force: bool,
) -> None:
    """Mint a user (a fresh NKey, its JWT signed by the account's signing key) and write its
    .creds file (mode 0600). A node may publish only its own telemetry and status, read only
    its own assignment and the model store, and receive only on its own inbox; it creates
    no JetStream consumer. No server needs to change: copy the creds file to the device
    and start `slmops edge --creds FILE`."""
    from slmops.cloud.trust import FleetDir
    from slmops.cloud.trust.fleetdir import Enrolled

    def mint() -> Enrolled:
        d = FleetDir(auth_dir)
        return d.enroll(role, fleet=fleet, node=node, name=name, out=out, js_domain=js_domain, force=force)  # type: ignore[arg-type]

    made = call(mint)
    click.echo(f"enrolled {made.record.name} (user {made.record.public})")
    click.echo(f"creds: {made.creds}  (mode 0600; {_WHERE_TO[role]})")


#: Where the creds file of each role goes, as ``enroll`` suggests it.
_WHERE_TO = {
    "node": "copy it to the device, e.g. /etc/slmops/nats.creds, and start `slmops edge --creds FILE`",
    "cloud": "copy it to the cloud's host, e.g. /etc/slmops/cloud.creds, and start "
    "`slmops cloud --creds FILE`",
    "operator": "keep it on the operator's machine, e.g. ~/.config/slmops/operator.creds, and give it "
    "with --creds or SLMOPS_NATS_CREDS",
    "analyst": "copy it to the analyst's machine, e.g. ~/.config/slmops/analyst.creds, and give it "
    "with --creds or SLMOPS_NATS_CREDS",
}


@click.command("revoke")
@_fleet_node_options("The node's fleet.", "The node to revoke (every key enrolled for it).")
@click.option("--user", "user_key", help="Revoke one user key (U...) instead, e.g. an analyst's.")
@nats_option
@click.option(
    "--no-push", is_flag=True, help="Only update the fleet directory (push later with `fleet push`)."
)
def revoke(
    auth_dir: Path,
    fleet: str | None,
    node: str | None,
    user_key: str | None,
    nats_url: str,
    no_push: bool,
) -> None:
    """Revoke a node's credentials: its user keys go into the account JWT's revocation list,
    which is pushed to the running server (--nats) through the system account
    ($SYS.REQ.CLAIMS.UPDATE). The server disconnects the device at once and refuses it from
    then on; no restart, no config reload. server.conf in the fleet directory is rewritten
    too (a server started later preloads the new list)."""
    from slmops.cloud.trust import FleetDir

    if (user_key is None) == (node is None):
        raise click.UsageError("give --fleet and --node, or --user")
    d = call(lambda: FleetDir(auth_dir))
    hits = call(lambda: d.revoke(fleet=fleet, node=node, public=user_key))
    for u in hits:
        click.echo(f"revoked {u.name} (user {u.public}) at {u.revoked_at}")
    if no_push:
        click.echo(f"not pushed: run `slmops fleet push --auth {d.path} --nats URL`")
        return
    _push(d.path, nats_url, d.accounts_of(hits))


@click.command("push")
@auth_dir_option
@nats_option
def push(auth_dir: Path, nats_url: str) -> None:
    """Push the fleet directory's current account JWTs (SLMOPS and OPERATOR: their
    revocations) to a running server (one of a cluster is enough), e.g. one that was down
    during `fleet revoke`. Connects as the directory's system user (any --creds is not used)."""
    _push(auth_dir, nats_url, None)


def _push(auth_dir: Path, url: str, accounts: list[str] | None) -> None:
    from slmops.cloud.trust import FleetDir, push_account
    from slmops.cloud.trust.fleetdir import ACCOUNT, OPERATOR_ACCOUNT
    from slmops.shared.connect import redact_url

    d = call(lambda: FleetDir(auth_dir))
    if accounts is None:
        accounts = [ACCOUNT, OPERATOR_ACCOUNT] if d.operator_account_public else [ACCOUNT]

    async def main() -> None:
        for which in accounts:
            answer = await push_account(url, d.sys_creds, d.account_jwt(which))
            click.echo(f"{redact_url(url)}: {which}: {answer}")

    run(main)


@click.command("server-config")
@auth_dir_option
@click.option(
    "--resolver-dir",
    required=True,
    help="Where this server keeps its account JWTs (its own, e.g. /var/lib/nats/jwt).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here (default: stdout).")
@click.option(
    "--leaf-site", is_flag=True, help="For a site's leaf server: also the account variables its remotes name."
)
def server_config(auth_dir: Path, resolver_dir: str, out: Path | None, leaf_site: bool) -> None:
    """Print the operator-mode part of a nats-server config (the operator JWT, the system
    account, a full resolver at --resolver-dir, the account JWTs preloaded), to `include`
    in each server's config (deploy/nats/jwt/). Holds no secret."""
    from slmops.cloud.trust import FleetDir

    text = call(lambda: FleetDir(auth_dir).server_conf_text(resolver_dir, leaf_site=leaf_site))
    if out is None:
        click.echo(text, nl=False)
    else:
        call(lambda: out.write_text(text))
