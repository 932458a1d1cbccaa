"""``slmops models optimize``: compress a bundle per device profile (``cloud.factory.search``
does the work; this parses, shows progress and prints)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from slmops.cli_common import call, out_dir_option, profiles_dir_option, samples_option, signing_key_option

if TYPE_CHECKING:
    from rich.progress import TaskID

    from slmops.cloud.factory.search import OptimizeRun

__all__ = ["optimize_cmd"]

F = TypeVar("F", bound=Callable[..., Any])


def _fraction(flag: str, default: float, what: str) -> Callable[[F], F]:
    return click.option(flag, default=default, show_default=True, type=click.FloatRange(0.0, 1.0),
                        help=f"Accuracy floor: {what}.")  # fmt: skip


@click.command(name="optimize")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@profiles_dir_option
@out_dir_option(
    "Directory for candidates/<name>/, one variant bundle per profile (<profile>/), report.json, "
    "report.md and report.png (created; files there are replaced)."
)
@signing_key_option
@click.option(
    "--candidates",
    "candidate_names",
    default="",
    help="Comma-separated candidate names to try (default: all; see --list).",
)
@click.option(
    "--list",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=lambda ctx, _param, value: _list(ctx) if value else None,
    help="Print the candidates and their pass chains, then exit.",
)
@_fraction(
    "--max-drop", 0.02, "never choose a candidate more than this below the teacher's held-out accuracy"
)
@_fraction("--min-accuracy", 0.0, "never choose a candidate below this held-out accuracy")
@samples_option(60)
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def optimize_cmd(
    bundle: Path,
    profiles_dir: Path,
    out_dir: Path,
    key_path: Path,
    candidate_names: str,
    max_drop: float,
    min_accuracy: float,
    samples: int,
    as_json: bool,
) -> None:
    """Compress BUNDLE (the fp32 MiniLM classifier) into candidates, measure each under every
    device profile, and sign one variant per profile.

    Candidates are chains of passes: layer dropping, vocabulary pruning, dynamic or static
    (QDQ) int8, head refit, the n-gram student distilled from BUNDLE's labels, distillation
    (needs torch; skipped when absent). Each is measured: held-out accuracy (paired with
    BUNDLE), agreement and largest probability gap with it, calibration error, latency
    p50/p95 at batch 1 and 32 under each profile's cores and threads as a ratio to BUNDLE in the
    same process, peak RSS, size on disk and gzipped. Per profile the most accurate candidate
    within its budgets and above the accuracy floor becomes variant <profile>.

    Exit 0 when every profile got a variant, 1 when some got none, 2 for a usage error.
    """
    from slmops.cloud.factory.optimize import DEFAULT_CANDIDATES, AccuracyFloor
    from slmops.cloud.factory.search import run_optimize
    from slmops.shared.bundle import load_private_key

    known = {c.name: c for c in DEFAULT_CANDIDATES}
    wanted = [n.strip() for n in candidate_names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise click.UsageError(f"unknown candidates {unknown}; known: {', '.join(known)}")
    specs = [known[n] for n in wanted] if wanted else list(DEFAULT_CANDIDATES)
    key = call(lambda: load_private_key(key_path))
    floor = AccuracyFloor(max_drop=max_drop, min_accuracy=min_accuracy)
    with _Bar(specs_count=len(specs)) as bar:
        run = call(
            lambda: run_optimize(
                bundle,
                profiles_dir,
                out_dir,
                key,
                candidates=specs,
                floor=floor,
                samples=samples,
                progress=bar.step,
            )
        )
    if as_json:
        click.echo(json.dumps(run.doc, indent=1))
    else:
        _summary(run)
    if not run.ok:
        raise SystemExit(1)


def _list(ctx: click.Context) -> None:
    from slmops.cloud.factory.optimize import DEFAULT_CANDIDATES

    for c in DEFAULT_CANDIDATES:
        click.echo(f"{c.name:<16} {' -> '.join(c.chain) or '(the teacher as it is)'}")
    ctx.exit(0)


class _Bar:
    """A rich progress bar per candidate on stderr (steps: build, measure, one per profile)."""

    def __init__(self, specs_count: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            TextColumn("{task.fields[step]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._count = specs_count
        self._total = 0

    def __enter__(self) -> _Bar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def step(self, candidate: str, what: str) -> None:
        if candidate not in self._tasks:
            self._tasks[candidate] = self._progress.add_task(candidate, total=None, step=what)
        task = self._tasks[candidate]
        if what == "done":
            self._progress.update(task, total=1, completed=1, step="done")
        else:
            self._progress.update(task, step=what)


def _summary(run: OptimizeRun) -> None:
    doc = run.doc
    t = doc["teacher"]
    click.echo(
        f"teacher  {t['name']} v{t['version']} accuracy {t['accuracy']:.4f} "
        f"(held-out {t['held_out']}); floor {doc['floor']:.4f}"
    )
    profiles = list(doc["profiles"])
    click.echo(f"{'candidate':<16}{'status':<8}{'acc':>7}{'agree':>7}{'MB':>7}{'gz MB':>7}"
               + "".join(f"{p + ' ratio':>15}" for p in profiles))  # fmt: skip
    for r in doc["candidates"]:
        ratios = "".join(
            f"{(str(r['profiles'][p]['latency_ratio']) + (' ok' if r['profiles'][p]['ok'] else ' x')):>15}"
            if p in r["profiles"]
            else f"{'-':>15}"
            for p in profiles
        )
        click.echo(
            f"{r['name']:<16}{r['status']:<8}{r['accuracy']:>7.4f}{r['agreement']:>7.3f}"
            f"{r['size_bytes'] / 1e6:>7.1f}{r['gzip_bytes'] / 1e6:>7.1f}{ratios}"
        )
        if r["note"]:
            click.echo(f"    note: {r['note']}")
    for p, name in doc["chosen"].items():
        click.echo(f"variant  {p:<10} {name or 'none fits above the floor'}  {doc['variants'].get(p, '')}")
    click.echo(f"report   {run.out_dir}/report.md, report.json, report.png")
