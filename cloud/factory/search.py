"""The whole ``slmops models optimize`` run: build every candidate, measure it under every
profile, choose per profile, sign the variants and write the report
(``cloud.factory.optimize`` holds the steps, ``cloud.factory.pareto`` the report).

Output directory layout: ``candidates/<name>/`` (every candidate's signed bundle, variant =
its name), ``<profile>/`` (the signed variant per profile), ``report.json``, ``report.md``,
``report.png``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory import choice
from slmops.cloud.factory import optimize as opt
from slmops.cloud.factory.pareto import pareto_names, write_json, write_markdown, write_plot
from slmops.shared.errors import BundleError
from slmops.shared.profiles import load_profiles

__all__ = ["OptimizeRun", "run_optimize"]

log = structlog.get_logger(__name__)

#: Batch-1 calls per candidate and profile (interleaved with the teacher's): the 95th
#: percentile of 60 is the 3rd slowest call; ``--samples`` raises it for steadier figures.
DEFAULT_SAMPLES = 60

#: ``progress(candidate, step)``: step is "build", "measure", "profile:<name>" or "done".
Progress = Callable[[str, str], None]


def _profile_step(step: Callable[[str, str], None], candidate: str, profile: str) -> None:
    step(candidate, f"profile:{profile}")


@dataclass(frozen=True, slots=True)
class OptimizeRun:
    """The report document (what ``report.json`` holds) and where the files went."""

    doc: dict[str, Any]
    out_dir: Path

    @property
    def ok(self) -> bool:
        """Every profile got a variant."""
        return all(v is not None for v in self.doc["chosen"].values())


def run_optimize(
    bundle: Path,
    profiles_dir: Path,
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    candidates: Sequence[opt.CandidateSpec] = opt.DEFAULT_CANDIDATES,
    floor: opt.AccuracyFloor | None = None,
    samples: int = DEFAULT_SAMPLES,
    progress: Progress | None = None,
) -> OptimizeRun:
    """Optimise ``bundle`` (the fp32 MiniLM classifier) for each profile in ``profiles_dir``.

    A candidate whose build fails is reported "failed" with its one-line error and the run
    goes on. Raises ``ConfigError`` for bad profiles, ``BundleError``/``ValueError`` for a
    teacher that cannot be optimised, ``ValueError`` for duplicate candidate names or
    ``samples < 20``."""
    if samples < 20:
        raise ValueError(f"samples must be at least 20 for a p95, got {samples}")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"candidate names must be unique and at least one, got {names}")
    profiles = choice.profiles_of(load_profiles(profiles_dir))
    floor = floor or opt.AccuracyFloor()
    teacher = opt.load_teacher(bundle)
    floor_value = floor.value(teacher.accuracy)
    out_dir = Path(out_dir)
    (out_dir / "candidates").mkdir(parents=True, exist_ok=True)

    def step(name: str, what: str) -> None:
        if progress is not None:
            progress(name, what)

    results: list[opt.CandidateResult] = []
    for spec in candidates:
        step(spec.name, "build")
        try:
            result = opt.build_candidate(spec, teacher, out_dir / "candidates", key)
            step(spec.name, "measure")
            opt.measure(
                result,
                teacher,
                profiles,
                samples=samples,
                on_profile=functools.partial(_profile_step, step, spec.name),
            )
        except (BundleError, ValueError, RuntimeError, OSError) as exc:
            result = opt.CandidateResult(spec, status="failed", note=str(exc).splitlines()[0][:300])
        log.info(
            "candidate_measured",
            candidate=spec.name,
            status=result.status,
            accuracy=round(result.accuracy, 4),
        )
        results.append(result)
        step(spec.name, "done")
    chosen = choice.choose(results, [p.name for p in profiles], floor_value)
    variants = {
        p: str(choice.write_variant(r, p, teacher, out_dir, key).path)
        for p, r in chosen.items()
        if r is not None
    }
    m = teacher.bundle.manifest
    rows = [choice.result_json(r, floor_value) for r in results]
    doc: dict[str, Any] = {
        "teacher": {
            "bundle": str(teacher.bundle.path),
            "name": m.name,
            "version": m.version,
            "variant": m.variant,
            "sha256": m.sha256,
            "accuracy": round(teacher.accuracy, 4),
            "held_out": len(teacher.split.held_out_texts),
            "train": len(teacher.split.train_texts),
            "seed": teacher.seed,
        },
        "floor": round(floor_value, 4),
        "floor_rule": {"max_drop": floor.max_drop, "min_accuracy": floor.min_accuracy},
        "samples": samples,
        "profiles": {
            p.name: {
                "cores": p.cores,
                "threads": p.threads,
                "latency_factor": p.latency_factor,
                "model_memory_mb": p.model_memory_mb,
                "model_disk_mb": p.model_disk_mb,
            }
            for p in profiles
        },
        "candidates": rows,
        "pareto": {p.name: sorted(pareto_names(rows, p.name)) for p in profiles},
        "chosen": {p: (None if r is None else r.spec.name) for p, r in chosen.items()},
        "variants": variants,
    }
    write_json(out_dir / "report.json", doc)
    write_markdown(out_dir / "report.md", doc)
    write_plot(out_dir / "report.png", doc)
    return OptimizeRun(doc, out_dir)
