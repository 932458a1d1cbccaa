"""``slmops bench``: measure the project against the bare libraries, same machine, same run."""

from __future__ import annotations

import json
import sys
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import click

from slmops.bench import LONG_SCENARIOS, SCENARIOS, machine, run_scenario
from slmops.bench.fleet_figures import DEFAULT_BACKLOG, figures_help
from slmops.cli_common import describe, leaf_errors
from slmops.shared.errors import SlmopsError


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


@click.command(epilog=figures_help())
@click.argument("scenario", type=click.Choice([*SCENARIOS, *LONG_SCENARIOS, "chaos", "fleet", "all"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per result line.")
@click.option("--quick", is_flag=True, help="Small sizes: a fast smoke run, figures not representative.")
@click.option(
    "--model",
    "model",
    default=None,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="edge: the bundle directory to measure (e.g. a `models build` variant); default: the n-gram model. "
    "generate: the generation bundle (required; e.g. `models build --arch smollm2` OUT/int4-embed).",
)
@click.option(
    "--runs", type=click.IntRange(1, 100), default=10, show_default=True, help="demo: runs in a row."
)
@click.option(
    "--load", type=click.IntRange(0, 64), default=2, show_default=True, help="demo: busy processes beside it."
)
@click.option(
    "--nodes",
    type=click.IntRange(1, 1_000_000),
    multiple=True,
    help="demo, chaos: edge nodes [5], at most 50; fleet: simulated nodes, repeatable (growth between runs).",
)
@click.option(
    "--minutes",
    type=float,
    default=None,
    help="chaos: how long faults go on [10]; fleet: steady windows [5].",
)
@click.option(
    "--backlog",
    type=click.IntRange(0, 100_000),
    default=DEFAULT_BACKLOG,
    show_default=True,
    help="fleet: buffered windows per reconnecting node (60 = an hour offline, 1440 a day; 0 skips "
    "the storm).",
)
@click.option(
    "--period", type=float, default=2.0, show_default=True, help="fleet: wall seconds per 60 s window."
)
@click.option("--seed", type=int, default=1, show_default=True, help="chaos: the fault schedule's seed.")
@click.option(
    "--rollout",
    is_flag=True,
    help="fleet: also roll version 2 out to every node (one 100% stage), then abort it; "
    "prints the times and the rollout state's sizes.",
)
def bench(
    scenario: str,
    as_json: bool,
    quick: bool,
    model: Path | None,
    runs: int,
    load: int,
    nodes: tuple[int, ...],
    minutes: float | None,
    backlog: int,
    period: float,
    seed: int,
    rollout: bool,
) -> None:
    """Measure a scenario: the project's path and the bare-library baseline, in the same run.

    \b
    edge      predictions/s via Python API and HTTP vs bare tokenizer + session.run and a bare
              aiohttp endpoint; per-call overhead µs; node RSS idle and peak
    buffer    telemetry events/s into SQLite vs bare aiosqlite executemany
    ingest    cloud aggregates/s vs bare nats-py fetch+ack
    drift     detection quality on synthetic fleets vs PSI and χ² rules
    refresh   assignment → nodes serving; delivery MB/s vs bare object get; int8 vs fp32
    recalibration  accuracy on label-shifted traffic: recalibrated vs unchanged model
    fuzz      hypothesis, 10,000 examples each: every wire decoder and the whole cloud
              ingest path (decode, checks, state, detectors); reports escapes (must be 0)
    cli       `slmops --help` and subcommands' --help vs `python -c pass` (median seconds)
    demo      `slmops demo` --runs times under --load busy processes: each run's outcome,
              wall time, model warm (cached) or cold (built); not part of `all`
    optimize  `models optimize` on the default model per seed (0-2; --quick: seed 0, three
              candidates): per profile the chosen variant vs L6 fp32, accuracy difference
              (paired), latency and size ratios, mean and spread; not part of `all`
    generate  a generation bundle (--model): decode tokens/s and time to first token via
              Python API and HTTP streaming vs bare onnxruntime-genai, node RSS, the prompt
              log-likelihood's cost; needs onnxruntime-genai; not part of `all`
    fleet     one cloud against --nodes N simulated nodes (repeat --nodes for the growth
              between N): ingest rate and lag, cloud RSS and SQLite bytes per node, drift
              round and `fleet status` time, drain after 10% reconnect at once with --backlog
              buffered windows each (own connections); bare JetStream publish/fetch beside it;
              logs warnings only unless --log-level is given; each figure below
    chaos     real server, cloud and edges under seeded faults (link cuts, kill -9 of edges,
              cloud and server, disk-full spells on a tmpfs, clock jumps via libfaketime,
              poison messages, duplicate node ids), then an exact reconciliation per node:
              answered == counted + loss receipts; exits 1 unless reconciled; not in `all`

    Prints what it measured and the baseline beside it; never passes or fails on a time
    (shared machines are noisy: compare the ratio, not the absolute figures).
    """
    if scenario == "fleet":
        root = click.get_current_context().find_root()
        if root.get_parameter_source("log_level") is click.core.ParameterSource.DEFAULT:
            # The cloud runs in this process: its info lines (one per node and drift event)
            # would bury the figures. Warnings and errors still show.
            from slmops.shared.logging import set_level

            set_level("warning")
        _fleet(nodes or (1000,), int(minutes or 5), backlog, period, as_json, rollout=rollout)
        return
    if len(nodes) > 1 or any(n > 50 for n in nodes):
        raise click.UsageError("--nodes: demo and chaos take one value, at most 50")
    if scenario == "chaos":
        _chaos(minutes or 10.0, nodes[0] if nodes else 5, seed, as_json)
        return
    names = SCENARIOS if scenario == "all" else (scenario,)
    if model is not None and scenario not in ("edge", "generate"):
        raise click.UsageError("--model applies to the edge and generate scenarios only")
    options: dict[str, Any] = {"model": model} if model is not None else {}
    info = machine()
    if not as_json:
        click.echo("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    failed = False
    for name in names:
        try:
            opts = (
                {"runs": runs, "load": load, "nodes": nodes[0] if nodes else None}
                if name == "demo"
                else options
            )
            results = anyio.run(lambda n=name, o=opts: run_scenario(n, quick=quick, **o))  # type: ignore[misc]
        except Exception as exc:  # one broken scenario must not hide the others' figures
            failed = True
            click.echo(f"bench {name} failed: {describe(exc)}", err=True)
            if not all(isinstance(e, SlmopsError | ValueError | OSError) for e in leaf_errors(exc)):
                click.echo("".join(traceback.format_exception(exc)), err=True)  # a bug: where
            continue
        for r in results:
            if as_json:
                click.echo(json.dumps({**r, "machine": info}))
            else:
                extra = {
                    k: v
                    for k, v in r.items()
                    if k not in ("scenario", "project", "baseline", "ratio", "units")
                }
                click.echo(
                    f"{r['scenario']:<28} project {_fmt(r['project'])} {r['units']}  "
                    f"baseline {_fmt(r['baseline'])}  ratio {_fmt(r['ratio'])}"
                    + (f"  {json.dumps(extra)}" if extra else "")
                )
    if failed:
        sys.exit(1)


def _chaos(minutes: float, nodes: int, seed: int, as_json: bool) -> None:
    from slmops.bench.chaos import run_chaos

    if minutes <= 0:
        raise click.UsageError("--minutes must be > 0")
    r = anyio.run(lambda: run_chaos(minutes=minutes, nodes=nodes, seed=seed))
    r["machine"] = machine()
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"faults: {json.dumps(r['faults'])}  skipped: {json.dumps(r['skipped'])}")
        click.echo(
            f"measured {r['counted'] + r['receipts']} (cloud counted {r['counted']} + receipts "
            f"{r['receipts']})  baseline {r['answered']} (answered: the clients' HTTP 200s)  "
            f"difference {r['cut_stored']} (cut requests stored, of {r['cut_texts']} cut texts)"
        )
        for key in ("answered", "counted", "receipts", "double_counted", "missing_seqs",
                    "poison_sent", "poison_deadlettered", "reconciled", "count_readings",
                    "drain_readings", "elapsed_s"):  # fmt: skip
            click.echo(f"{key:<20} {r[key]}")
        for row in r["per_node"]:
            click.echo("  " + json.dumps(row))
    if not r["reconciled"]:
        click.echo(f"chaos: NOT reconciled; logs kept in {r.get('logs')}", err=True)
        sys.exit(1)


def _fleet(
    nodes: tuple[int, ...], minutes: int, backlog: int, period: float, as_json: bool, *, rollout: bool = False
) -> None:
    from slmops.bench.fleet import growth, load_average, run_fleet

    if minutes < 1 or period <= 0:
        raise click.UsageError("--minutes must be >= 1 and --period > 0")
    info = machine()
    results = []
    for n in nodes:
        load_before = load_average()
        r = anyio.run(
            partial(run_fleet, nodes=n, minutes=minutes, period=period, backlog=backlog, rollout=rollout)
        )
        r["load_before"], r["load_after"] = load_before, load_average()
        results.append(r)
        if as_json:
            click.echo(json.dumps({"scenario": "fleet", **r, "machine": info}))
        else:
            click.echo(f"fleet, {n} nodes:")
            for key, value in r.items():
                click.echo(f"  {key:<44} {_fmt(value)}")
    for row in growth(results):
        if as_json:
            click.echo(json.dumps({"scenario": "fleet_growth", **row}))
        else:
            click.echo(
                f"growth {row['figure']:<28} {row['from_nodes']} -> {row['to_nodes']} nodes "
                f"(x{row['nodes_ratio']:g}): x{row['growth']:g} ({row['kind']})"
            )
    if not all(r["exactly_once"] for r in results):
        click.echo("fleet: some node's count differs from what it sent", err=True)
        sys.exit(1)
