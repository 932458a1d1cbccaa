"""``slmops edge``: run one edge node (thin: parse, then ``anyio.run`` into ``edge.node``)."""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click

from slmops import cli_common
from slmops.cli_common import config_options, nats_option, parameter_origins, run, trust_option
from slmops.shared.errors import BundleError, PortUnavailable

if TYPE_CHECKING:
    from slmops.edge.config import EdgeConfig
    from slmops.shared.errors import ConfigError


@click.command()
@nats_option
@click.option("--fleet", default=None, help="Fleet id (one subject token: A-Z a-z 0-9 _ -). Required.")
@click.option("--node", default=None, help="This node's id, unique in the fleet (same rules). Required.")
@click.option(
    "--data",
    "data_dir",
    envvar="SLMOPS_EDGE_DATA",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Data directory: SQLite telemetry buffer and model cache (created if missing). Required.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    help="Bundle directory to install at start; repeat to serve several models side by side "
    "(different names; the first is the default, requests pick one by its name). Without it "
    "the cached models are used; with neither, /v1/predict answers 503 until an assigned "
    "model arrives. A cached newer version of the same model is kept (no silent downgrade).",
)
@trust_option(
    "Public key (PEM) whose bundle signatures are accepted; repeat for several. "
    "Env: SLMOPS_EDGE_TRUST (space-separated).",
    envvar=None,
)
@trust_option(
    "Root public key (PEM) of the fleet's signed key list (KV slmops_keys, `slmops keys rotate`): "
    "the list adds, retires and revokes bundle-signing keys; repeat for several roots.",
    envvar=None,
    flag="--trust-root",
)
@click.option(
    "--http",
    default="127.0.0.1:8470",
    show_default=True,
    help="HOST:PORT of the local HTTP API (port 0 = any free port), or 'off'. A non-loopback "
    "address needs a bearer token (--http-token-file or SLMOPS_EDGE_HTTP_TOKEN).",
)
@click.option(
    "--http-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File holding the bearer token every API request must carry (Authorization: Bearer ...), "
    "16+ characters. Env: SLMOPS_EDGE_HTTP_TOKEN_FILE, or the token itself in SLMOPS_EDGE_HTTP_TOKEN.",
)
@click.option("--http-token", default=None, hidden=True, envvar="SLMOPS_EDGE_HTTP_TOKEN")
@click.option("--window", default="60s", show_default=True, help="Telemetry window, e.g. 500ms, 2s, 1m.")
@click.option(
    "--min-count",
    default=10,
    show_default=True,
    type=int,
    help="k of k-anonymity: a window with fewer inferences is not published alone (it joins the next).",
)
@click.option("--max-text-chars", default=10_000, show_default=True, type=int, help="Longest accepted text.")
@click.option("--max-batch", default=32, show_default=True, type=int, help="Most texts per ORT micro-batch.")
@click.option(
    "--max-batch-wait",
    default="0ms",
    show_default=True,
    help="How long a micro-batch waits for more requests (0 = take what is queued).",
)
@click.option("--threads", default=1, show_default=True, type=int, help="ORT intra-op threads.")
@click.option(
    "--profile",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Device profile file (deploy/profiles/*.toml): its name is reported to the cloud, which "
    "assigns the variant made for it, and its memory_mb bounds the models served together.",
)
@click.option(
    "--memory-mb",
    default=None,
    type=int,
    help="Memory (MB) the served models' needs must fit in together [default: the profile's, "
    "else this machine's; 0 = not checked].",
)
@click.option(
    "--outbox-max",
    default="16MiB",
    show_default=True,
    help="Disk bound of the outbox; beyond it old unsent windows are merged, then dropped "
    "with a loss receipt.",
)
@click.option(
    "--dp-epsilon", type=float, default=None, help="Differential privacy: epsilon per window (off if unset)."
)
@click.option(
    "--dp-budget", type=float, default=None, help="Total epsilon this node may spend (unlimited if unset)."
)
@click.option("--status-interval", default="30s", show_default=True, help="Period of status reports.")
@click.option(
    "--js-domain",
    default=None,
    help="JetStream domain of the hub, for a device at a leaf site in operator mode (e.g. hub).",
)
@config_options('data, nats, window = "60s"...; see deploy/edge.toml', "SLMOPS_EDGE_CONFIG")
def edge(
    nats_url: str,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    nats_creds: Path | None,
    fleet: str | None,
    node: str | None,
    data_dir: Path | None,
    model: tuple[Path, ...],
    trust: tuple[Path, ...],
    trust_root: tuple[Path, ...],
    http: str,
    http_token_file: Path | None,
    http_token: str | None,
    window: str,
    min_count: int,
    max_text_chars: int,
    max_batch: int,
    max_batch_wait: str,
    threads: int,
    profile: Path | None,
    memory_mb: int | None,
    outbox_max: str,
    dp_epsilon: float | None,
    dp_budget: float | None,
    status_interval: str,
    js_domain: str | None,
    config_file: Path | None,
    print_config: bool,
) -> None:
    """Run an edge node: local ONNX inference over HTTP, privacy-filtered telemetry in SQLite,
    window aggregates sent to NATS JetStream whenever the link is up.

    The node starts and serves even when NATS is unreachable. Every flag can also be set
    with an SLMOPS_EDGE_* environment variable (e.g. SLMOPS_EDGE_FLEET); --nats with
    SLMOPS_NATS_URL. Stops cleanly on Ctrl-C or SIGTERM.
    """
    from slmops.edge.config import EdgeConfig
    from slmops.shared.config import config_origins
    from slmops.shared.errors import ConfigError

    data = {
        "nats_url": nats_url,
        "tls_ca": None if tls_ca is None else str(tls_ca),
        "tls_cert": None if tls_cert is None else str(tls_cert),
        "tls_key": None if tls_key is None else str(tls_key),
        "nats_creds": None if nats_creds is None else str(nats_creds),
        "js_domain": js_domain,
        "fleet": fleet,
        "node": node,
        "data_dir": data_dir,
        "model": model[0] if model else None,
        "models": [str(p) for p in model[1:]] or None,
        "trust": list(trust) or None,
        "trust_root": [str(p) for p in trust_root] or None,
        "http": http,
        "http_token_file": None if http_token_file is None else str(http_token_file),
        "http_token": http_token,
        "window": window,
        "min_count": min_count,
        "max_text_chars": max_text_chars,
        "max_batch": max_batch,
        "max_batch_wait": max_batch_wait,
        "intra_op_threads": threads,
        "profile": None if profile is None else str(profile),
        "memory_mb": memory_mb,
        "outbox_max_bytes": outbox_max,
        "dp_epsilon": dp_epsilon,
        "dp_budget": dp_budget,
        "status_interval": status_interval,
    }
    # Only values given on the command line or in the environment override the --config
    # file; click's defaults must not (they equal EdgeConfig's own defaults).
    ctx = click.get_current_context()
    param_of = {
        "nats_url": "nats_url",
        "intra_op_threads": "threads",
        "outbox_max_bytes": "outbox_max",
        "models": "model",
    }
    origins = parameter_origins(ctx, {key: param_of.get(key, key) for key in data})
    data = {key: value if key in origins else None for key, value in data.items()}
    try:
        config = EdgeConfig.build(data, config_file)
        if print_config:
            cli_common.print_config(config, config_origins(EdgeConfig, data, config_file, origins))
            return
    except ConfigError as exc:
        raise _usage_error(exc, ctx, {f: param_of.get(f, f) for f in origins}) from exc
    try:
        config.data_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        origin = origins.get("data_dir", f"data_dir in {config_file}")
        where = {"flag": "--data"}.get(origin, origin.removeprefix("env "))
        reason = exc.strerror or str(exc)
        message = f"{where}: cannot create the data directory {config.data_path}: {reason}"
        raise click.UsageError(message) from exc
    level = str(ctx.find_root().params.get("log_level") or "info")
    run(partial(_serve, config, level), until_signal=True, exit_codes={BundleError: 2})


def _usage_error(exc: ConfigError, ctx: click.Context, params: dict[str, str]) -> click.UsageError:
    """``exc`` as click's "Invalid value for '--threads': must be >= 1, got -2" when its reason
    starts with a config field given by a flag or the environment (``params``: field -> click
    parameter name); else as it is (a config file's key is named as in the file)."""
    for field, name in params.items():
        match = re.match(rf"`?{re.escape(field)}`?\b:?\s*", exc.reason)
        param = next((p for p in ctx.command.params if p.name == name), None)
        if exc.source == "flags" and match and param is not None:
            return click.BadParameter(exc.reason[match.end() :], ctx=ctx, param=param)
    return click.UsageError(str(exc))


async def _serve(config: EdgeConfig, log_level: str = "info") -> None:
    """Run the node and its HTTP API until cancelled (by a signal, in ``run``)."""
    import structlog

    from slmops.edge.api import serve_api
    from slmops.edge.node import EdgeNode

    # Every log line of this process names the node (tasks inherit context variables).
    structlog.contextvars.bind_contextvars(fleet=config.fleet, node=config.node)
    async with EdgeNode(config, log_level=log_level) as node, AsyncExitStack() as stack:
        address = config.http_address
        if address is not None:
            try:
                await stack.enter_async_context(serve_api(node))
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise PortUnavailable(*address, "--http", reason) from exc
        await anyio.sleep_forever()
