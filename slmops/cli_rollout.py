"""``slmops rollout ...``: start, watch and steer staged rollouts. Parsing only; the work is in
``cloud.rollout`` (state in KV ``slmops_rollouts``, driven by the rollout controller that runs in
the cloud service or in ``slmops rollout run``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click
import msgspec

from slmops.cli_common import cloud_key_options, fleet_id, nats_option, run
from slmops.cli_common import jetstream as _jetstream
from slmops.shared.config import parse_duration

if TYPE_CHECKING:
    from slmops.cloud.rollout import RolloutState

__all__ = ["parse_percent", "parse_stages", "rollout"]

T = TypeVar("T")

_fleet = click.option("--fleet", required=True, help="Fleet id.")


def parse_stages(value: str) -> list[int]:
    """``"5,25,100"`` → ``[5, 25, 100]`` (validated by ``RolloutConfig``)."""
    try:
        return [int(p.strip().rstrip("%")) for p in value.split(",") if p.strip()]
    except ValueError as exc:
        raise ValueError(f"stages {value!r} is not valid: use percentages like 5,25,100") from exc


def parse_percent(value: str, *, whole: bool = False) -> float:
    """``"2%"`` → 0.02; a bare number ≤ 1 is a fraction, above 1 a percentage. ``whole``:
    100% is allowed too."""
    text = value.strip()
    try:
        number = float(text.rstrip("%"))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a percentage: use e.g. 2% or 0.02") from exc
    fraction = number / 100 if text.endswith("%") or number > 1 else number
    if not (0 <= fraction <= 1 if whole else 0 <= fraction < 1):
        raise ValueError(f"{value!r} must be between 0% and 100%")
    return fraction


def _flag(flag: str, parse: Callable[[str], T], value: str) -> T:
    """``parse(value)``; its ``ValueError`` as a usage error naming ``flag`` ("Invalid value for
    '--stages': ...") — options parsed in the command body have no click param to name."""
    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{flag}'") from exc


@click.group()
def rollout() -> None:
    """Staged rollouts of a model version to a fleet, with quality gates and automatic rollback.

    Nodes are split into cohorts by a stable hash of their id. Each stage assigns the version
    to its cohort (variant per device), waits for the installs, soaks, and judges canary
    against control: install/smoke-test failures, latency p95, error rate, confidence and
    class-mix drift, each with a minimum sample count. A failing gate returns the stage's
    nodes to the previous version; the last stage makes the version fleet-wide. Events go to
    slmops.rollout.<fleet>. The controller runs in the cloud service or `slmops rollout run`.
    """


@rollout.command()
@nats_option
@_fleet
@click.option("--version", "version", required=True, type=click.IntRange(min=1), help="Version to roll out.")
@click.option("--model", default=None, help="Model name (default: the fleet's current model).")
@click.option(
    "--stages", default="5,25,100", show_default=True, help="Cumulative percentages, ending at 100."
)
@click.option(
    "--soak", default="2m", show_default=True, help="Soak time per stage after installs (500ms, 2m...)."
)
@click.option(
    "--max-failures",
    default="2%",
    show_default=True,
    help="Share of a stage's nodes that may fail to install or roll back on their own.",
)
@click.option(
    "--min-samples",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Inferences the canary needs before the gates judge.",
)
@click.option(
    "--install-timeout",
    default="5m",
    show_default=True,
    help="How long a stage waits for its nodes to install.",
)
@click.option(
    "--min-quality",
    default=None,
    help="Generation models: share of the version's quality set (exact match / containment) "
    "its canary nodes must pass, e.g. 80% or 0.8 [default: no quality gate].",
)
@click.option(
    "--side-by-side/--default-model",
    "side_by_side",
    default=None,
    help="Roll out on the model's per-model keys (a model served beside the nodes' default one) "
    "or on the legacy keys (the default model) [default: side by side when the fleet already "
    "assigns this model side by side, or its fleet key names another model].",
)
def start(
    nats_url: str,
    fleet: str,
    version: int,
    model: str | None,
    stages: str,
    soak: str,
    max_failures: str,
    min_samples: int,
    install_timeout: str,
    min_quality: str | None,
    side_by_side: bool | None,
) -> None:
    """Start rolling out --version to --fleet (refused while another rollout is active)."""
    from slmops.cloud.registry import Registry
    from slmops.cloud.rollout import RolloutConfig, RolloutStore, start_rollout

    def whole_stages(value: str) -> list[int]:
        return RolloutConfig(stages=parse_stages(value)).stages  # its checks, named as --stages

    def not_negative(value: str) -> float:
        seconds = parse_duration(value)
        if seconds < 0:
            raise ValueError(f"duration {value!r} must not be negative")
        return seconds

    try:
        config = RolloutConfig(
            stages=_flag("--stages", whole_stages, stages),
            soak_s=_flag("--soak", not_negative, soak),
            max_failures=_flag("--max-failures", parse_percent, max_failures),
            min_samples=min_samples,
            install_timeout_s=_flag("--install-timeout", not_negative, install_timeout),
            min_quality=None
            if min_quality is None
            else _flag("--min-quality", partial(parse_percent, whole=True), min_quality),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc

    async def go() -> None:
        from slmops.cloud.audit.rollout import rollout_summary
        from slmops.cloud.fleetconfig.client import request_change
        from slmops.shared.audit import ChangeRequest

        # Through the active cloud (audited with the identity the server gives); with no
        # cloud serving the fleet, written here and said to be unaudited.
        params = {
            "version": version, "model": model, "config": msgspec.to_builtins(config),
            "side_by_side": side_by_side,
        }  # fmt: skip
        reply = await request_change(
            nats_url, ChangeRequest(action="rollout.start", fleet=fleet, params=params)
        )
        if reply is not None:
            s = reply.result
        else:
            click.echo(f"note: no cloud serves fleet {fleet}: started directly, not audited", err=True)
            async with _jetstream(nats_url) as js:
                state = await start_rollout(
                    js, Registry(js, url=nats_url), RolloutStore(js, url=nats_url),
                    fleet=fleet, version=version, model=model, config=config, side_by_side=side_by_side,
                )  # fmt: skip
            s = rollout_summary(state)
        beside = ", side by side (per-model keys)" if s["side_by_side"] else ""
        click.echo(
            f"rollout {s['id']}: {s['model']} v{s['version']} "
            f"(from v{s['previous_version']}) stages {config.stages}, soak {config.soak_s:g}s{beside}"
        )

    run(go)


@rollout.command()
@nats_option
@click.option("--fleet", default=None, help="Only this fleet (default: every fleet with a rollout).")
@click.option("--json", "as_json", is_flag=True, help="Print the full states as JSON (one array).")
def status(nats_url: str, fleet: str | None, as_json: bool) -> None:
    """Show rollouts: stage, phase, nodes, failures and the last gate results."""
    from slmops.cloud.rollout import RolloutStore

    async def go() -> list[RolloutState]:
        async with _jetstream(nats_url, provision=False) as js:
            store = RolloutStore(js, url=nats_url)
            if fleet is not None:
                got = await store.get(fleet)
                return [] if got is None else [got[0]]
            return [s for s, _ in await store.all()]

    states = run(go)
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(states), indent=2))
        return
    if not states:
        click.echo("no rollouts")
        return
    for s in states:
        _print_state(s)


@rollout.command()
@nats_option
@click.option("--fleet", default=None, callback=fleet_id, help="Only this fleet (default: every fleet).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per rollout, per line.")
def history(nats_url: str, fleet: str | None, as_json: bool) -> None:
    """Every rollout, oldest first: versions, when, its outcome and why it started and ended
    (also rollouts the cloud started itself to answer drift, and those a later one replaced)."""
    from slmops.cloud.rollout.history import rollout_history

    async def go() -> list[Any]:
        async with _jetstream(nats_url, provision=False) as js:
            return await rollout_history(js, fleet, url=nats_url)

    records = run(go)
    if as_json:
        for r in records:
            click.echo(json.dumps(msgspec.to_builtins(r)))
        return
    if not records:
        click.echo("no rollouts")
        return
    for r in records:
        started = r.started.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{started}Z  {r.fleet}  {r.model} v{r.previous_version} → v{r.version}  {r.outcome:<11} "
            f"stage {r.stage} ({r.percent}%)  {r.rollout}"
        )
        if r.trigger:
            click.echo(f"    started: {r.trigger}")
        if r.reason:
            click.echo(f"    {'ended' if r.outcome != 'running' else 'last'}: {r.reason}")


rollout.add_command(history, name="list")


def _figure(value: object) -> str:
    """A gate figure for the table: "-" for none, 4 significant digits for a float."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_state(s: RolloutState) -> None:
    updated = datetime.fromtimestamp(s.updated, UTC).strftime("%Y-%m-%d %H:%M:%S")
    click.echo(f"{s.fleet}  {s.id}")
    beside = "   side by side" if s.side_by_side else ""
    click.echo(
        f"  {s.model} v{s.previous_version} → v{s.version}   {s.status}/{s.phase}"
        f"   updated {updated}Z{beside}"
    )
    assigned = f"{len(s.nodes)} node{'' if len(s.nodes) == 1 else 's'} assigned"
    click.echo(f"  stage {s.stage + 1}/{len(s.config.stages)} ({s.percent}%), {assigned}")
    for node, why in sorted(s.failures.items()):
        click.echo(f"  failed {node}: {why}")
    for node, why in sorted(s.unfit.items()):
        click.echo(f"  left out {node}: {why}")
    for name, g in s.gates.items():
        if isinstance(g, dict):
            line = f"  gate {name:<12} {g.get('outcome')}"
            if g.get("canary") is not None or g.get("control") is not None:
                line += f"  canary {_figure(g.get('canary'))}  control {_figure(g.get('control'))}"
                line += f"  limit {_figure(g.get('limit'))}"
            if g.get("detail"):  # e.g. "no control group", "no labelled answers yet"
                line += f"  ({g['detail']})"
            click.echo(line)
    if s.reason:
        click.echo(f"  reason: {s.reason}")


def _command(name: str, doc: str) -> click.Command:
    @click.command(name=name, help=doc)
    @nats_option
    @_fleet
    def cmd(nats_url: str, fleet: str) -> None:
        from slmops.cloud.rollout import RolloutStore

        async def go() -> None:
            from slmops.cloud.fleetconfig.client import request_change
            from slmops.shared.audit import ChangeRequest

            reply = await request_change(nats_url, ChangeRequest(action=f"rollout.{name}", fleet=fleet))
            if reply is not None:
                rollout_id = reply.result["id"]
            else:
                click.echo(f"note: no cloud serves fleet {fleet}: recorded directly, not audited", err=True)
                async with _jetstream(nats_url) as js:
                    state = await RolloutStore(js, url=nats_url).command(fleet, name)  # type: ignore[arg-type]
                rollout_id = state.id
            click.echo(
                f"{name} recorded for rollout {rollout_id}; the controller applies it at its next step"
            )

        run(go)

    return cmd


rollout.add_command(_command("pause", "Hold the rollout at its stage (gates still roll back a bad canary)."))
rollout.add_command(_command("resume", "Let a paused rollout continue (restarts a sample wait)."))
rollout.add_command(
    _command("abort", "Stop the rollout and return every node it moved to what it ran before.")
)


@rollout.command("run")
@nats_option
@click.option("--interval", default="1s", show_default=True, help="Time between controller steps.")
@cloud_key_options("off")
def run_controller(nats_url: str, interval: str, key_path: Path | None, recalibrate: str) -> None:
    """Run the rollout controller (and the recalibration loop) until Ctrl-C or SIGTERM.

    Only needed when the cloud service does not run them; it runs the same tasks, built the
    same way (cloud.service). Safe to run twice: state writes are compare-and-set, so two
    controllers never both drive one rollout, and drift events go to one durable consumer,
    so each is acted on once.
    """
    from slmops.cloud.config import CloudConfig
    from slmops.shared.config import load_config

    data: dict[str, Any] = {
        "nats_url": nats_url,
        "rollout_interval": interval,
        "recalibrate": recalibrate,
        "key": None if key_path is None else str(key_path),
    }
    try:
        config = load_config(CloudConfig, data)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc

    async def go() -> None:
        from slmops.cloud.service import run_controllers

        async with anyio.create_task_group() as tg:
            await tg.start(partial(run_controllers, config))
            click.echo(
                f"rollout controller running (recalibration: {config.recalibrate}); Ctrl-C stops it",
                err=True,
            )

    run(go, until_signal=True)
