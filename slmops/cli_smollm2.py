"""``slmops models build --arch smollm2``: print what ``cloud.factory.smollm2_build`` built."""

from __future__ import annotations

import json
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cli_common import call

__all__ = ["build_smollm2_command"]


def build_smollm2_command(
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    name: str,
    version: int,
    seed: int,
    weights_dir: Path | None,
    variants: str,
    as_json: bool,
) -> None:
    from slmops.cloud.factory.smollm2_build import build_smollm2

    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    report = call(
        lambda: build_smollm2(
            out_dir, key, name=name, version=version, variants=chosen, seed=seed, weights_dir=weights_dir
        )
    )
    rows = [
        {
            "variant": v.name,
            "path": str(v.path),
            "size_bytes": v.size_bytes,
            "rss_load_mb": v.memory.load_mb,
            "rss_peak_mb": v.memory.peak_mb,
            "min_memory_mb": v.min_memory_mb,
            "smoke_token_ids": v.smoke,
            "seconds": round(v.seconds, 1),
        }
        for v in report.variants
    ]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "variants": rows,
                    "reference_prompts": report.prompts,
                    "convert_seconds": round(report.convert_seconds, 1),
                    "converted_cached": report.converted_cached,
                    "seconds": round(report.seconds, 1),
                }
            )
        )
        return
    cached = " (cached)" if report.converted_cached else ""
    click.echo(f"bundles      {out_dir}/<variant>  ({name} v{version}; SmolLM2-135M-Instruct)")
    click.echo(f"convert      {report.convert_seconds:.1f} s{cached}; reference from {report.prompts} "
               "held-out prompts")  # fmt: skip
    click.echo(f"{'variant':<12}{'size MB':>9}{'RSS MB':>8}{'peak MB':>9}{'min MB':>8}{'s':>7}")
    for v in report.variants:
        click.echo(
            f"{v.name:<12}{v.size_bytes / 1e6:>9.1f}{v.memory.load_mb:>8.0f}{v.memory.peak_mb:>9.0f}"
            f"{v.min_memory_mb:>8}{v.seconds:>7.1f}"
        )
    click.echo(f"factory      {report.seconds:.1f} s")
