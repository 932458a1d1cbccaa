"""Choosing and signing the variant per device profile for ``slmops models optimize``: the
floor and budget rule (``choose``), the signed ``<profile>`` bundle with its chain and figures
(``write_variant``) and a candidate's row of ``report.json``."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.minilm import MEMORY_HEADROOM
from slmops.cloud.factory.optimize import CandidateResult, Teacher
from slmops.shared.bundle import Bundle, FileData, read_bundle, write_bundle
from slmops.shared.messages import Optimization
from slmops.shared.profiles import ProfileSpec

__all__ = ["choose", "profiles_of", "result_json", "write_variant"]


def choose(
    results: Sequence[CandidateResult], profiles: Sequence[str], floor: float
) -> dict[str, CandidateResult | None]:
    """Per profile: the most accurate candidate whose lab run there passed every budget and
    whose accuracy is at least ``floor`` (ties: the smaller bundle); None when none does."""
    chosen: dict[str, CandidateResult | None] = {}
    for p in profiles:
        fit = [r for r in results if r.fits(p) and r.accuracy >= floor]
        chosen[p] = max(fit, key=lambda r: (r.accuracy, -r.size_bytes)) if fit else None
    return chosen


def write_variant(
    result: CandidateResult, profile: str, teacher: Teacher, out_dir: Path, key: Ed25519PrivateKey
) -> Bundle:
    """Sign ``result``'s bundle as variant ``profile`` into ``out_dir/<profile>``, with its
    chain and figures in ``manifest.optimization`` and ``min_memory_mb`` = peak RSS under
    the profile × 1.5, rounded up to 16 MB (the factory's headroom rule)."""
    assert result.path is not None
    src = read_bundle(result.path)
    lab = result.lab[profile]
    record = Optimization(
        profile=profile,
        candidate=result.spec.name,
        chain=list(result.spec.chain),
        teacher_sha256=teacher.bundle.manifest.sha256,
        seed=teacher.seed,
        held_out=len(teacher.split.held_out_texts),
        accuracy=round(result.accuracy, 4),
        teacher_accuracy=round(teacher.accuracy, 4),
        agreement=round(result.agreement, 4),
        max_prob_gap=round(result.max_prob_gap, 4),
        ece=round(result.ece, 4),
        latency_ratio=lab.latency_ratio,
        latency_p50_ms=lab.latency.p50_ms,
        latency_p95_ms=lab.latency.p95_ms,
        batch32_p50_ms=lab.latency.batch32_p50_ms,
        peak_rss_mb=lab.peak_rss_mb,
        size_bytes=result.size_bytes,
        gzip_bytes=result.gzip_bytes,
        notes=list(lab.notes),
    )
    manifest = msgspec.structs.replace(
        src.manifest,
        variant=profile,
        optimization=record,
        min_memory_mb=int(math.ceil(lab.peak_rss_mb * MEMORY_HEADROOM / 16.0) * 16),
        requires=None,
    )
    target = Path(out_dir) / profile
    if target.exists():
        shutil.rmtree(target)
    files: bytes | list[FileData]
    if src.manifest.files:
        files = [FileData(f.path, (src.path / f.path).read_bytes(), f.role) for f in src.manifest.files]
    else:
        files = src.model_path.read_bytes()
    return write_bundle(target, files, manifest, key)


def profiles_of(specs: Mapping[str, ProfileSpec]) -> list[ProfileSpec]:
    """Profiles in a stable order: the most constrained (smallest latency factor) first."""
    return sorted(specs.values(), key=lambda s: (s.latency_factor, s.name))


def result_json(r: CandidateResult, floor: float) -> dict[str, Any]:
    """One candidate's row of ``report.json``."""
    return {
        "name": r.spec.name,
        "chain": list(r.spec.chain),
        "status": r.status,
        "note": r.note,
        "bundle": None if r.path is None else str(r.path),
        "accuracy": round(r.accuracy, 4),
        "under_floor": r.status == "ok" and r.accuracy < floor,
        "agreement": round(r.agreement, 4),
        "max_prob_gap": round(r.max_prob_gap, 4),
        "ece": round(r.ece, 4),
        "wins": r.wins,
        "losses": r.losses,
        "size_bytes": r.size_bytes,
        "gzip_bytes": r.gzip_bytes,
        "profiles": {p: lab.to_json() for p, lab in r.lab.items()},
    }
