"""``slmops bench``: measure the project against the bare libraries, same machine, same run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import click

from slmops.bench import LONG_SCENARIOS, SCENARIOS, machine, run_scenario


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


@click.command()
@click.argument("scenario", type=click.Choice([*SCENARIOS, *LONG_SCENARIOS, "all"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per result line.")
@click.option("--quick", is_flag=True, help="Small sizes: a fast smoke run, figures not representative.")
@click.option(
    "--model",
    "model",
    default=None,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="edge: the bundle directory to measure (e.g. a `models build` variant); default: the n-gram model.",
)
@click.option(
    "--runs", type=click.IntRange(1, 100), default=10, show_default=True, help="demo: runs in a row."
)
@click.option(
    "--load", type=click.IntRange(0, 64), default=2, show_default=True, help="demo: busy processes beside it."
)
@click.option("--nodes", type=click.IntRange(2, 50), default=None, help="demo: its --nodes [5].")
def bench(
    scenario: str, as_json: bool, quick: bool, model: Path | None, runs: int, load: int, nodes: int | None
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
    demo      `slmops demo` --runs times under --load busy processes: each run's outcome,
              wall time, model warm (cached) or cold (built); not part of `all`

    Prints what it measured and the baseline beside it; never passes or fails on a time
    (shared machines are noisy: compare the ratio, not the absolute figures).
    """
    names = SCENARIOS if scenario == "all" else (scenario,)
    if model is not None and scenario != "edge":
        raise click.UsageError("--model applies to the edge scenario only")
    options: dict[str, Any] = {"model": model} if model is not None else {}
    info = machine()
    if not as_json:
        click.echo("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    failed = False
    for name in names:
        try:
            opts = {"runs": runs, "load": load, "nodes": nodes} if name == "demo" else options
            results = anyio.run(lambda n=name, o=opts: run_scenario(n, quick=quick, **o))  # type: ignore[misc]
        except Exception as exc:  # one broken scenario must not hide the others' figures
            failed = True
            click.echo(f"bench {name} failed: {type(exc).__name__}: {exc}", err=True)
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
