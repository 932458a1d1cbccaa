"""``slmops models test``: run a bundle the way a device class would (``cloud.factory.lab``
does the work; this parses and prints)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from slmops.cli_common import call, profiles_dir_option, samples_option

if TYPE_CHECKING:
    from slmops.cloud.factory.lab import LabResult

__all__ = ["test_cmd"]


@click.command(name="test")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--profile",
    "profile_refs",
    multiple=True,
    help="A device profile: a name in --profiles, or a path to a profile .toml. Repeat for several; "
    "default: every profile in --profiles.",
)
@profiles_dir_option
@click.option(
    "--reference",
    "reference",
    default=None,
    type=click.Path(exists=True, path_type=Path),
    help="The L6 fp32 bundle latency budgets are relative to. Default: the factory's default "
    "model's fp32 variant from the model cache (built there first when absent, ~1 min).",
)
@samples_option(200)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of the table.")
def test_cmd(
    bundle: Path,
    profile_refs: tuple[str, ...],
    profiles_dir: Path,
    reference: Path | None,
    samples: int,
    as_json: bool,
) -> None:
    """Run BUNDLE as each device profile would, and check it against the profile's budgets.

    In fresh processes pinned to the profile's cores (CPU affinity) with its thread count: the
    smoke tests, latency (p50/p95 at batch 1, p50 at batch 32) on the corpus's held-out texts
    interleaved with the reference L6 fp32 model, peak RSS, and size on disk. The latency budget
    is the profile's `latency_factor` times the reference's p95 measured in the same run;
    memory is judged by peak RSS; absolute times are printed, never judged.

    A generation bundle (e.g. SmolLM2 from `models build --arch smollm2`) runs alone in such a
    process: its smoke tests and 20 greedy answers to held-out texts (at most 32 new tokens
    each), printing time to first token (p50/p95) and decode tokens/s (median answer, and all
    answers' tokens over their decode time), judged on smoke tests, peak RSS and size only
    (no reference; --reference and --samples are not used).

    Exit 0 when every profile's smoke tests and budgets hold, 1 when any fails, 2 for a usage
    error (an unknown profile, a bad profile file).
    """
    from slmops.cloud.factory.lab import run_profile
    from slmops.shared.bundle import read_bundle
    from slmops.shared.profiles import find_profile, load_profiles

    def work() -> list[LabResult]:
        specs = (
            [find_profile(r, profiles_dir) for r in profile_refs]
            if profile_refs
            else list(load_profiles(profiles_dir).values())
        )
        generation = read_bundle(bundle).manifest.task == "generation"
        ref = reference if reference is not None or generation else _default_reference()
        return [run_profile(bundle, spec, ref, samples=samples) for spec in specs]

    results = call(work)
    if as_json:
        doc = {"ok": all(r.ok for r in results), "results": [r.to_json() for r in results]}
        click.echo(json.dumps(doc, indent=1))
    else:
        _table(results)
    if not all(r.ok for r in results):
        raise SystemExit(1)


def _default_reference() -> Path:
    from slmops.cloud.factory.cache import cached_minilm

    return cached_minilm().bundles["fp32"]


def _table(results: list[LabResult]) -> None:
    classifiers = any(r.generation is None for r in results)
    if classifiers:
        click.echo(
            f"{'profile':<10} {'variant':<9} {'smoke':<5} {'p50 ms':>8} {'p95 ms':>8} {'ref p95':>8} "
            f"{'ratio':>6} {'budget':>6} {'RSS MB':>7} {'/ max':>6} {'size MB':>8} {'/ max':>6}  verdict"
        )
    for r in results:
        verdict = "ok" if r.ok else "FAIL"
        if r.generation is not None:
            g = r.generation
            click.echo(
                f"{r.profile:<10} {r.variant:<9} {'ok' if r.smoke_ok else 'FAIL':<5} "
                f"time to first token p50 {g.ttft_p50_ms:.1f} ms, p95 {g.ttft_p95_ms:.1f} ms; "
                f"{g.tokens_per_s:.1f} tokens/s ({g.answers} answers, {g.output_tokens} tokens); "
                f"RSS {r.peak_rss_mb:.0f}/{r.model_memory_mb} MB, "
                f"{r.size_mb:.1f}/{r.model_disk_mb} MB  {verdict}"
            )
            for line in [*(f"note: {n}" for n in r.notes), *(f"fails {f}" for f in r.failures)]:
                click.echo(f"    {line}")
            continue
        click.echo(
            f"{r.profile:<10} {r.variant:<9} {'ok' if r.smoke_ok else 'FAIL':<5} {r.latency.p50_ms:>8.2f} "
            f"{r.latency.p95_ms:>8.2f} {r.reference.p95_ms:>8.2f} {r.latency_ratio:>6.2f} "
            f"{r.latency_factor:>6.2f} "
            f"{r.peak_rss_mb:>7.0f} {r.model_memory_mb:>6} {r.size_mb:>8.1f} {r.model_disk_mb:>6}  {verdict}"
        )
        for line in r.notes:
            click.echo(f"    note: {line}")
        for line in r.failures:
            click.echo(f"    fails {line}")
    if classifiers:
        click.echo(
            "latency budget: p95 <= budget x the reference L6 fp32's p95, same host, same run; "
            "memory: peak RSS <= the profile's model_memory_mb (RSS MB / max); size: the bundle's bytes "
            "on disk <= its model_disk_mb (size MB / max)"
        )
