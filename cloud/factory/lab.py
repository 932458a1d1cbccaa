"""The device lab: run a bundle the way a device class would (``slmops models test``).

For a profile (``shared.profiles``) the bundle runs in fresh processes pinned to the profile's
cores (CPU affinity; a host with fewer cores runs with its own, and the result says so) with the
profile's ONNX Runtime thread count (``shared.devicerun``):

1. smoke tests (the manifest's, with that variant's tolerances, plus the hostile texts);
2. latency, batch 1 and batch 32, on serving-shaped texts (the corpus's held-out utterances),
   **interleaved text by text with the reference** L6 fp32 bundle in one process, so the ratio
   is measured under one load; the budget is ``p95 <= latency_factor x reference p95``;
3. peak RSS of a process serving the bundle alone (``VmHWM``), against ``model_memory_mb``;
4. the bundle's bytes on disk, against ``model_disk_mb``.

Absolute milliseconds are printed, never judged: a shared x86 host is not the device
(docs/decisions/0008-relative-device-budgets.md).

A generation bundle (task "generation") runs in one pinned process instead
(``shared.devicerun`` mode ``generation``): its smoke tests, ``GENERATION_ANSWERS`` greedy
answers to held-out texts (at most ``GENERATION_MAX_NEW_TOKENS`` new tokens each) timed for
time to first token and decode tokens/s, and the peak RSS. Memory and disk are judged as above;
time to first token and tokens/s are printed, not judged (there is no generation reference to
be relative to), and no reference bundle is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.shared.bundle import read_bundle
from slmops.shared.profiles import ProfileSpec

__all__ = ["GenerationLab", "LabResult", "Latency", "default_texts", "run_profile"]

#: Batch-1 calls per bundle and per profile: enough for a stable p95 (the 95th of 200 is the
#: 10th slowest call), short enough for CI (~2 s per profile for MiniLM int8-l3 here).
DEFAULT_SAMPLES = 200


@dataclass(frozen=True, slots=True)
class Latency:
    """Milliseconds per call, batch 1 and batch 32."""

    p50_ms: float
    p95_ms: float
    batch32_p50_ms: float
    batch32_p95_ms: float = 0.0


#: Answers per generation bundle and profile, and their new-token limit: 20 × 32 tokens took
#: ~1 s for the suite's tiny decoder; about 20 s for SmolLM2-135M int4 at ~40 tokens/s.
GENERATION_ANSWERS = 20
GENERATION_MAX_NEW_TOKENS = 32


@dataclass(frozen=True, slots=True)
class GenerationLab:
    """A generation bundle's figures under one profile: time to first token (ms, p50/p95
    over the answers), decode tokens/s (median answer, and over all answers' tokens)."""

    answers: int
    output_tokens: int
    max_new_tokens: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    tokens_per_s_p50: float
    tokens_per_s: float


@dataclass(frozen=True, slots=True)
class LabResult:
    """One bundle under one profile. ``failures`` names each broken budget; ``ok`` = none."""

    profile: str
    bundle: str
    variant: str
    cpus: list[int]
    threads: int
    smoke_ok: bool
    smoke_error: str
    latency: Latency
    reference: Latency
    #: candidate p95 / reference p95 (batch 1), and the profile's ceiling for it.
    latency_ratio: float
    latency_factor: float
    peak_rss_mb: float
    model_memory_mb: int
    size_mb: float
    model_disk_mb: int
    #: How memory was judged (here always the peak RSS; no cgroup limit is set).
    memory_method: str
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: Generation bundles: their figures (then ``latency``/``reference`` are zeros).
    generation: GenerationLab | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def default_texts(seed: int = 0) -> list[str]:
    """The corpus's held-out utterances (what nodes are asked), in a fixed order."""
    from slmops.cloud.factory.corpus import load_topics, split_topics

    split = split_topics(load_topics(), seed=seed)
    return list(split.held_out_texts)


def _bundle_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _child(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``shared.devicerun`` with ``request``; raise ``RuntimeError`` naming its last error line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(request["threads"])}
    proc = subprocess.run(
        [sys.executable, "-m", "slmops.shared.devicerun"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        last = lines[-1] if lines else f"exit {proc.returncode}"
        raise RuntimeError(f"{request['mode']} run of {request['bundle']} failed: {last}")
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def _latency(doc: dict[str, Any]) -> Latency:
    return Latency(
        p50_ms=round(doc["batch1"]["p50_ms"], 3),
        p95_ms=round(doc["batch1"]["p95_ms"], 3),
        batch32_p50_ms=round(doc["batch32"]["p50_ms"], 3),
        batch32_p95_ms=round(doc["batch32"]["p95_ms"], 3),
    )


def run_profile(
    bundle: Path,
    profile: ProfileSpec,
    reference: Path | None,
    *,
    texts: Sequence[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    timeout: float = 600.0,
) -> LabResult:
    """Measure ``bundle`` under ``profile`` against ``reference`` (L6 fp32). Raises
    ``BundleError`` when a bundle cannot be read, ``RuntimeError`` when a measuring process
    fails, ``ValueError`` for ``samples < 20`` or a classifier without ``reference``. A
    generation bundle needs no reference (module docstring)."""
    if samples < 20:
        raise ValueError(f"samples must be at least 20 for a p95, got {samples}")
    manifest = read_bundle(Path(bundle)).manifest
    if manifest.task != "generation":
        if reference is None:
            raise ValueError(f"{bundle} is a {manifest.task} bundle: its latency needs the reference bundle")
        read_bundle(Path(reference))  # fail early, naming the reference
    lines = list(texts) if texts is not None else default_texts()
    cpus = profile.host_cores()
    notes: list[str] = []
    if len(cpus) < profile.cores:
        notes.append(f"profile asks {profile.cores} cores; this host gives {len(cpus)}: ran on {len(cpus)}")
    if profile.providers and profile.providers != ["CPUExecutionProvider"]:
        notes.append(f"providers {profile.providers} are not used here: ran on CPUExecutionProvider")
    base = {"cpus": cpus, "threads": profile.threads, "texts": lines, "samples": samples}
    if manifest.task == "generation":
        return _run_generation(bundle, profile, manifest.variant, base, notes, timeout)
    assert reference is not None
    mem = _child({**base, "mode": "memory", "bundle": str(bundle)}, timeout)
    lat = _child({**base, "mode": "latency", "bundle": str(bundle), "reference": str(reference)}, timeout)
    cand, ref = _latency(lat["candidate"]), _latency(lat["reference"])
    ratio = cand.p95_ms / ref.p95_ms if ref.p95_ms > 0 else float("inf")
    size_mb, failures = _budgets(profile, bundle, mem)
    if ratio > profile.latency_factor:
        failures.insert(
            1 if failures and failures[0].startswith("smoke") else 0,
            f"latency: p95 {cand.p95_ms:.2f} ms is {ratio:.2f}x L6 fp32's {ref.p95_ms:.2f} ms "
            f"(budget {profile.latency_factor}x)",
        )
    return _result(bundle, profile, manifest.variant, cpus, mem, (cand, ref, ratio), size_mb, notes, failures)


def _result(
    bundle: Path,
    profile: ProfileSpec,
    variant: str,
    cpus: list[int],
    doc: dict[str, Any],
    latency: tuple[Latency, Latency, float],
    size_mb: float,
    notes: list[str],
    failures: list[str],
    generation: GenerationLab | None = None,
) -> LabResult:
    """A ``LabResult`` from the smoke/memory child's ``doc`` and the latency figures
    (candidate, reference, p95 ratio)."""
    cand, ref, ratio = latency
    return LabResult(
        profile=profile.name,
        bundle=str(bundle),
        variant=variant,
        cpus=cpus,
        threads=profile.threads,
        smoke_ok=bool(doc["smoke_ok"]),
        smoke_error=str(doc["smoke_error"]),
        latency=cand,
        reference=ref,
        latency_ratio=round(ratio, 3),
        latency_factor=profile.latency_factor,
        peak_rss_mb=float(doc["peak_mb"]),
        model_memory_mb=profile.model_memory_mb,
        size_mb=round(size_mb, 2),
        model_disk_mb=profile.model_disk_mb,
        memory_method="peak RSS (VmHWM) of a process serving the bundle alone; no cgroup limit set",
        notes=notes,
        failures=failures,
        generation=generation,
    )


def _budgets(profile: ProfileSpec, bundle: Path, smoke: dict[str, Any]) -> tuple[float, list[str]]:
    """(size in MB, failures) of the smoke tests, memory and disk budgets."""
    size_mb = _bundle_bytes(Path(bundle)) / 1e6
    failures: list[str] = []
    if not smoke["smoke_ok"]:
        failures.append(f"smoke: {smoke['smoke_error']}")
    if smoke["peak_mb"] > profile.model_memory_mb:
        failures.append(f"memory: peak RSS {smoke['peak_mb']:.0f} MB > {profile.model_memory_mb} MB")
    if size_mb > profile.model_disk_mb:
        failures.append(f"disk: {size_mb:.1f} MB > {profile.model_disk_mb} MB")
    return size_mb, failures


def _run_generation(
    bundle: Path, profile: ProfileSpec, variant: str, base: dict[str, Any], notes: list[str], timeout: float
) -> LabResult:
    """A generation bundle under ``profile`` (module docstring)."""
    req = {**base, "samples": GENERATION_ANSWERS, "max_new_tokens": GENERATION_MAX_NEW_TOKENS}
    doc = _child({**req, "mode": "generation", "bundle": str(bundle)}, timeout)
    size_mb, failures = _budgets(profile, bundle, doc)
    gen = None
    if "answers" in doc:
        gen = GenerationLab(
            answers=int(doc["answers"]),
            output_tokens=int(doc["output_tokens"]),
            max_new_tokens=GENERATION_MAX_NEW_TOKENS,
            ttft_p50_ms=round(doc["ttft"]["p50_ms"], 3),
            ttft_p95_ms=round(doc["ttft"]["p95_ms"], 3),
            tokens_per_s_p50=round(doc["tokens_per_s_p50"], 2),
            tokens_per_s=round(doc["tokens_per_s"], 2),
        )
    notes.append("generation model: time to first token and tokens/s are printed, not judged (no reference)")
    zero = Latency(p50_ms=0.0, p95_ms=0.0, batch32_p50_ms=0.0)
    ttft = zero if gen is None else Latency(gen.ttft_p50_ms, gen.ttft_p95_ms, 0.0)
    return _result(
        bundle, profile, variant, base["cpus"], doc, (ttft, zero, 0.0), size_mb, notes, failures, gen
    )
