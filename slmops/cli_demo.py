"""``slmops demo``: the whole system on one machine, with a live view."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import click

from slmops.cli_common import arch_option


@click.command()
@click.option(
    "--nodes", default=5, show_default=True, type=click.IntRange(2, 50), help="Edge node processes."
)
@click.option(
    "--duration",
    default=90.0,
    show_default=True,
    type=click.FloatRange(10, 3600),
    help="The pace: the steady state lasts 15% of it and the offline node's time before the shift "
    "10%; every other phase ends when its event happens (each within a generous bound).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="No live view; print the summary as one JSON line at the end."
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the model and the traffic (0: the model `slmops models build` makes, so one cached "
    "build serves both).",
)
@arch_option(
    "minilm: the default model (its int8-l3 variant), built once into the factory's cache "
    "(~/.cache/slmops/models, keyed by its inputs; the first run downloads the weights and builds "
    "for about 2 minutes). ngram: the small hashed n-gram model, built in seconds."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep logs, stores and databases in this new directory (default: a temporary one, removed).",
)
@click.option(
    "--generative",
    is_flag=True,
    help="After the story, a second fleet of two nodes serving chat with SmolLM2 (one goes offline "
    "and comes back); skipped, saying why, without onnxruntime-genai or a SmolLM2 bundle (built once "
    "into the factory's cache with the smollm2-convert extra).",
)
@click.option(
    "--generative-model",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="--generative: serve this generation bundle instead of SmolLM2 (with --generative-trust).",
)
@click.option(
    "--generative-trust",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="--generative-model: the public key that signed it.",
)
def demo(
    nodes: int,
    duration: float,
    as_json: bool,
    seed: int,
    arch: str,
    workdir: Path | None,
    generative: bool,
    generative_model: Path | None,
    generative_trust: Path | None,
) -> None:
    """Run the whole story on this machine, nothing else needed.

    Starts an embedded nats-server, the cloud and NODES edge node processes with the factory's
    default model, drives traffic from the real corpus, then: one node loses its link and keeps
    serving; a shift hits part of the fleet and drift events appear; the cloud recalibrates and
    rolls out a new version; the offline node reconnects, drains and refreshes. Each phase ends
    when its event happens. Ends with a summary: per node, inferences served vs counted by the
    cloud (equal); if a phase failed, which check, its figures and the log line to read (the
    work directory is then kept). Exits 0 only if every check of the story held.
    """
    from slmops.demo.story import DemoOptions, run_demo
    from slmops.demo.view import phase_line

    opts = DemoOptions(
        nodes=nodes, duration=duration, seed=seed, workdir=workdir, arch=arch, generative=generative,
        generative_model=generative_model, generative_trust=generative_trust,
    )  # fmt: skip
    if as_json:
        summary = anyio.run(lambda: run_demo(opts))
    elif not sys.stdout.isatty():  # a log file or a pipe: one line per phase, as it starts
        summary = anyio.run(lambda: run_demo(opts, on_phase=lambda s: click.echo(phase_line(s))))
    else:
        from rich.live import Live

        from slmops.demo.view import render

        with Live(refresh_per_second=4, transient=False) as live:
            summary = anyio.run(lambda: run_demo(opts, on_update=lambda s, f: live.update(render(s, f))))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_summary(summary)
    sys.exit(0 if summary["ok"] else 1)


def _print_summary(summary: dict[str, Any]) -> None:
    click.echo("\nsummary")
    for p in summary["phases"]:
        click.echo(f"  {p['phase']:>4} {p['title']} ({p['seconds']:.1f}s)")
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
    failure = summary.get("failure")
    if failure:
        click.echo(f"stopped at phase {failure.get('phase', '?')}: {failure.get('what', '')}")
        if failure.get("detail"):
            click.echo(f"  check: {failure['detail']}")
        if failure.get("log"):
            click.echo(f"  read: {failure['log']}")
    gen = summary.get("generative")
    if gen is not None:
        _print_generative(gen)
    if summary.get("workdir"):
        click.echo(f"logs, stores and databases kept in {summary['workdir']}")
    cached = summary.get("model_cached")
    if cached is not None:
        click.echo(f"model v1: {'from the cache (warm)' if cached else 'built this run (cold)'}")
    click.echo(f"demo {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f} s")


def _print_generative(gen: dict[str, Any]) -> None:
    if gen["skipped"]:
        click.echo(f"generative: skipped: {gen['skipped']}")
        return
    click.echo(f"generative ({gen['model']}): {'ok' if gen['ok'] else 'FAILED'}")
    for s in gen["steps"]:
        click.echo(f"  {s['step']} ({s['seconds']:.1f}s)")
    for node, row in gen["nodes"].items():
        click.echo(
            f"  {node:<10} chats answered {row['answered']}, counted {row['counted']}, failed {row['failed']}"
        )
    if gen["failure"]:
        click.echo(f"  stopped: {gen['failure']}")
