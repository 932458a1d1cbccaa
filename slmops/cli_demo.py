"""``slmops demo``: the whole system on one machine, with a live view."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import click


@click.command()
@click.option(
    "--nodes", default=5, show_default=True, type=click.IntRange(2, 50), help="Edge node processes."
)
@click.option(
    "--duration",
    default=90.0,
    show_default=True,
    type=click.FloatRange(40, 3600),
    help="Target seconds for the whole story (traffic phases scale with it).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="No live view; print the summary as one JSON line at the end."
)
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the model and the traffic.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep logs, stores and databases in this new directory (default: a temporary one, removed).",
)
def demo(nodes: int, duration: float, as_json: bool, seed: int, workdir: Path | None) -> None:
    """Run the whole story on this machine, nothing else needed.

    Starts an embedded nats-server, the cloud and NODES edge node processes with the factory's
    default model, drives traffic from the real corpus, then: one node loses its link and keeps
    serving; a shift hits part of the fleet and drift events appear; the cloud recalibrates and
    rolls out a new version; the offline node reconnects, drains and refreshes. Ends with a
    summary: per node, inferences served vs counted by the cloud (equal). Exits 0 only if every
    check of the story held.
    """
    from slmops.demo.story import DemoOptions, run_demo

    opts = DemoOptions(nodes=nodes, duration=duration, seed=seed, workdir=workdir)
    if as_json or not sys.stdout.isatty():
        summary = anyio.run(lambda: run_demo(opts))
    else:
        from rich.live import Live

        from slmops.demo.view import render

        with Live(refresh_per_second=4, transient=False) as live:
            summary = anyio.run(lambda: run_demo(opts, on_update=lambda s, f: live.update(render(s, f))))
        _print_summary(summary)
    if as_json:
        click.echo(json.dumps(summary))
    elif not sys.stdout.isatty():
        _print_summary(summary)
    sys.exit(0 if summary["ok"] else 1)


def _print_summary(summary: dict[str, Any]) -> None:
    click.echo("\nsummary")
    click.echo(f"{'node':<10}{'served':>8}{'counted':>9}  model")
    for row in summary["nodes"]:
        click.echo(f"{row['node']:<10}{row['served']:>8}{row['counted']!s:>9}  v{row['model_version']}")
    click.echo(
        f"drift events: {summary['drift_events']} (opened {summary['drift_opened']}); "
        f"versions: {summary['versions']}; rollout events: {summary['rollout_events']}"
    )
    raw = summary["bytes_raw_equivalent"] or 1
    click.echo(
        f"telemetry bytes sent: {summary['bytes_sent']:,} vs {raw:,} as raw per-event JSON "
        f"({float(summary['bytes_sent']) / float(raw):.1%})"
    )
    for name, ok in summary["checks"].items():
        click.echo(f"  [{'ok' if ok else 'FAILED'}] {name}")
    for m in summary["missing"]:
        click.echo(f"  missing: {m}")
    click.echo("demo ok" if summary["ok"] else "demo FAILED")
