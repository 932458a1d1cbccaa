"""``slmops cloud`` and ``slmops drift watch``: parsing and output only; the work is in
``cloud.service`` and ``cloud.ingest.query`` (``fleet`` and ``status`` are in ``cli_fleet``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
import msgspec

from slmops import cli_common
from slmops.cli_common import cloud_key_options, config_options, fleet_id, nats_option, parameter_origins, run
from slmops.cli_common import table_line as _line
from slmops.shared.config import parse_duration
from slmops.shared.vocabulary import DriftKind

if TYPE_CHECKING:
    from slmops.shared.messages import DriftEvent

__all__ = ["cloud", "drift"]

# -- slmops cloud ------------------------------------------------------------------------------


@click.command("cloud")
@nats_option
@click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("slmops-cloud"),
    show_default=True,
    envvar="SLMOPS_CLOUD_STATE",
    help="Directory of the cloud's SQLite state. Standbys that should take over without losing "
    "totals must share it. Env: SLMOPS_CLOUD_STATE.",
)
@click.option(
    "--fleet",
    "fleets",
    multiple=True,
    callback=fleet_id,
    help="Watch only this fleet and run only its rollouts (repeatable). Default: every fleet.",
)
@config_options(
    'nats, state, batch_size, lease_ttl = "10s", [drift] min_count...; see deploy/cloud.toml',
    "SLMOPS_CLOUD_CONFIG",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Aggregates per pull, transaction and ack; the next batch is prefetched [4096].",
)
@click.option("--lease-ttl", default=None, help="Single-active lease TTL, e.g. 10s [10s].")
@click.option(
    "--min-count", type=int, default=None, help="Inferences a node window needs to be tested [100]."
)
@click.option(
    "--target-false-rate",
    type=float,
    default=None,
    help="Target false drift events per node-window on stationary traffic [5e-5].",
)
@cloud_key_options(None)
@click.option(
    "--rollouts/--no-rollouts",
    default=None,
    show_default="on",
    help="Run the rollout controller in the active instance.",
)
@click.option(
    "--http",
    "http",
    default=None,
    help="HOST:PORT of the read-only web console, its JSON API and /metrics (Prometheus), "
    "e.g. 127.0.0.1:8480 [off]. A non-loopback address needs --http-token.",
)
@click.option(
    "--http-token",
    envvar="SLMOPS_CLOUD_HTTP_TOKEN",
    default=None,
    help="Bearer token the console and /metrics require (16+ characters). Env: SLMOPS_CLOUD_HTTP_TOKEN.",
)
def cloud(
    nats_url: str,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    nats_creds: Path | None,
    state_dir: Path,
    fleets: tuple[str, ...],
    config_file: Path | None,
    batch_size: int | None,
    lease_ttl: str | None,
    min_count: int | None,
    target_false_rate: float | None,
    key_path: Path | None,
    recalibrate: str | None,
    rollouts: bool | None,
    http: str | None,
    http_token: str | None,
    print_config: bool,
) -> None:
    """Run the cloud service: ingest telemetry, keep the fleet state, detect drift, publish
    drift events on slmops.drift.<fleet>. Runs until Ctrl-C or SIGTERM.

    Several instances may run against one NATS: one is active (it holds the lease
    `cloud[-<fleets>]` in KV slmops_leases), the others stand by and take over within one
    lease TTL when it stops.
    """
    from slmops.cloud.config import CloudConfig
    from slmops.shared.config import config_origins, load_config

    data: dict[str, Any] = {
        "nats_url": nats_url,
        "tls_ca": None if tls_ca is None else str(tls_ca),
        "tls_cert": None if tls_cert is None else str(tls_cert),
        "tls_key": None if tls_key is None else str(tls_key),
        "nats_creds": None if nats_creds is None else str(nats_creds),
        "state_dir": str(state_dir),
        "fleets": list(fleets),
        "batch_size": batch_size,
        "lease_ttl": lease_ttl,
        "key": None if key_path is None else str(key_path),
        "recalibrate": recalibrate,
        "rollouts": rollouts,
        "http": http,
        "http_token": http_token,
    }
    # Only what the command line or the environment gave overrides the --config file.
    param_of = {"fleets": "fleets", "key": "key_path", "state_dir": "state_dir"}
    origins = parameter_origins(click.get_current_context(), {k: param_of.get(k, k) for k in data})
    data = {k: v if k in origins else None for k, v in data.items()}
    try:
        drift_flags = {"min_count": min_count, "target_false_rate": target_false_rate}
        drift_flags = {k: v for k, v in drift_flags.items() if v is not None}
        config = load_config(CloudConfig, data, config_file)
        if drift_flags:
            merged = {**msgspec.to_builtins(config.drift), **drift_flags}
            config = msgspec.structs.replace(config, drift=msgspec.convert(merged, type(config.drift)))
            origins["drift"] = "flag (" + ", ".join(f"--{k.replace('_', '-')}" for k in drift_flags) + ")"
        if print_config:
            found = config_origins(CloudConfig, data, config_file, origins)
            cli_common.print_config(config, {**found, **{k: v for k, v in origins.items() if k == "drift"}})
            return
    except (ValueError, msgspec.ValidationError) as exc:
        raise click.BadParameter(str(exc)) from exc

    async def main() -> None:
        from slmops.cloud.service import assemble, tune_gc

        tune_gc()
        async with assemble(config) as svc:
            click.echo(
                f"slmops cloud {svc.holder}: state {config.state_dir}, fleets "
                f"{', '.join(config.fleets) or 'all'}; Ctrl-C stops it",
                err=True,
            )
            if svc.http_address is not None:
                host, port = svc.http_address
                click.echo(f"console and /metrics on http://{host}:{port}/", err=True)
            await anyio.sleep_forever()

    run(main, until_signal=True)


# -- slmops drift watch ------------------------------------------------------------------------


@click.group("drift")
def drift() -> None:
    """Drift events: what the cloud found in the fleet's traffic."""


#: ``drift watch``'s table fits this many columns (an analyst's terminal).
WATCH_COLUMNS = 120


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _event_row(e: DriftEvent) -> list[str]:
    where = e.node if e.scope == "node" and e.node else "(fleet)"
    what = e.state if e.kind == DriftKind.DRIFT else e.kind
    return [
        e.time.astimezone(UTC).strftime("%m-%d %H:%M:%S"),
        _cut(e.fleet, 12),
        _cut(where, 12),
        _cut(f"{e.model.name} v{e.model.version}", 12),
        _cut(e.signal, 18),
        _cut(what, 9),
        e.severity[:4],
        f"{e.effect_size:.3f}"[:5],
        _cut(e.reference, 17),
    ]


def _event_lines(e: DriftEvent) -> list[str]:
    """One event in at most ``WATCH_COLUMNS`` columns: its row, then its summary (or, for an
    older event without one, its statistic and estimates) indented and wrapped."""
    import textwrap

    detail = e.summary
    if not detail:
        detail = f"{e.statistic}={e.value:.3g}" + (f" p={e.p_value:.2g}" if e.p_value is not None else "")
        if e.estimated_priors:
            detail += "; priors " + ",".join(f"{k}={v:.2f}" for k, v in e.estimated_priors.items())
    if e.supersedes:
        detail += f" (follows {e.supersedes})"
    wrapped = textwrap.wrap(detail, WATCH_COLUMNS - 4) or [""]
    return [_line(_event_row(e), _EVENT_WIDTHS), *("    " + w for w in wrapped[:3])]


def _event_wide(e: DriftEvent) -> list[str]:
    """``--wide``: the event's row with no field cut (fleet, node, model and variant, signal,
    reference with its period), then its id, the event it follows, its statistic, the
    estimated priors and the whole summary, one per line, never wrapped."""
    where = e.node if e.scope == "node" and e.node else "(fleet)"
    what = e.state if e.kind == DriftKind.DRIFT else e.kind
    ref = e.reference
    if e.reference_start is not None and e.reference_end is not None:
        ref += f" ({e.reference_start:%m-%d %H:%M}–{e.reference_end:%m-%d %H:%M})"
    row = [
        e.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        e.fleet,
        where,
        f"{e.model.name} v{e.model.version} {e.model.variant}".rstrip(),
        e.signal,
        what,
        e.severity,
        f"{e.effect_size:.4f}",
        ref,
    ]
    out = ["  ".join(row), f"    id: {e.id}"]
    if e.supersedes:
        out.append(f"    follows: {e.supersedes}")
    stat = f"{e.statistic}={e.value:.4g}" + (f" p={e.p_value:.3g}" if e.p_value is not None else "")
    out.append(f"    statistic: {stat}")
    if e.estimated_priors:
        out.append("    priors: " + ", ".join(f"{k}={v:.3f}" for k, v in e.estimated_priors.items()))
    if e.summary:
        out.append(f"    summary: {e.summary}")
    return out


_EVENT_HEADER = ["time (UTC)", "fleet", "node", "model", "signal", "event", "sev", "effect", "reference"]
_EVENT_WIDTHS = [14, 12, 12, 12, 18, 9, 4, 6, 0]


@drift.command("watch")
@nats_option
@click.option("--fleet", default=None, callback=fleet_id, help="Only this fleet. Default: every fleet.")
@click.option(
    "--since", default="1h", show_default=True, help="Replay events from this long ago, e.g. 30m, 2d."
)
@click.option("--all", "replay_all", is_flag=True, help="Replay every stored event (overrides --since).")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line instead of a table.")
@click.option(
    "--wide",
    is_flag=True,
    help="No field cut to fit 120 columns: full names, event id, the event it follows, whole summary.",
)
@click.option("--limit", type=int, default=None, help="Exit after this many events (for scripts).")
def watch(
    nats_url: str,
    fleet: str | None,
    since: str,
    replay_all: bool,
    as_json: bool,
    wide: bool,
    limit: int | None,
) -> None:
    """Replay recent drift events, then follow new ones live. Ctrl-C exits (code 0).

    The table fits 120 columns (long names are cut with "…", the summary wraps at 3 lines);
    --wide or --json show every field in full."""
    try:
        seconds = parse_duration(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    if limit is not None and limit < 1:
        raise click.BadParameter(f"must be >= 1, got {limit!r}", param_hint="--limit")
    start = None if replay_all else datetime.now(UTC) - timedelta(seconds=seconds)

    async def main() -> None:
        from slmops.cloud.ingest.query import watch_drift
        from slmops.shared.connect import connect_once
        from slmops.shared.messages import encode_json

        nc = await connect_once(nats_url)
        seen = 0
        try:
            if not as_json and not wide:
                click.echo(_line(_EVENT_HEADER, _EVENT_WIDTHS))
            async for event in watch_drift(nc, fleet, start):
                if as_json:
                    click.echo(encode_json(event).decode())
                elif wide:
                    for line in _event_wide(event):
                        click.echo(line)
                else:
                    for line in _event_lines(event):
                        click.echo(line)
                seen += 1
                if limit is not None and seen >= limit:
                    break
        finally:
            with anyio.CancelScope(shield=True):
                await nc.close()

    run(main, until_signal=True)
