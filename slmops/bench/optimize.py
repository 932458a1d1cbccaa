"""``slmops bench optimize``: for the default model, ``models optimize`` per seed, and per device
profile the chosen variant against the unoptimised L6 fp32 model: paired accuracy difference
(same held-out texts), latency ratio (p50 and p95 at batch 1, the profile's cores and threads,
interleaved with L6 fp32 in one process) and size ratio (bundle bytes), as mean and spread
(max - min) over the seeds.

Issue 12's goal for the till: >= 4x faster (p50, batch 1, 1 thread), >= 4x smaller, within 1
point of L6 fp32's accuracy, mean of 3 seeds. Each seed's teacher is the cached default build
for that seed (``cloud.factory.cache``: ~2 min to build one the first time). Long (tens of
minutes for 3 seeds and every candidate); ``--quick`` runs seed 0 with three candidates.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread

__all__ = ["run"]

SEEDS = (0, 1, 2)
QUICK_CANDIDATES = ("int8-l3", "int8-l2-vocab", "ngram")


def _one_seed(seed: int, names: tuple[str, ...] | None, samples: int) -> dict[str, Any]:
    from slmops.cloud.factory.cache import cached_minilm
    from slmops.cloud.factory.optimize import DEFAULT_CANDIDATES
    from slmops.cloud.factory.search import run_optimize
    from slmops.shared.bundle import load_private_key, new_keypair

    teacher = cached_minilm(seed=seed).bundles["fp32"]
    specs = [c for c in DEFAULT_CANDIDATES if names is None or c.name in names]
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="slmops-bench-opt-") as tmp:
        key_path, _ = new_keypair(Path(tmp), "bench")
        run = run_optimize(
            teacher, root / "deploy" / "profiles", Path(tmp) / "out", load_private_key(key_path),
            candidates=specs, samples=samples,
        )  # fmt: skip
    return run.doc


def _per_profile(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {r["name"]: r for r in doc["candidates"]}
    teacher_acc = doc["teacher"]["accuracy"]
    teacher_size = rows["fp32-l6"]["size_bytes"] if "fp32-l6" in rows else None
    out: dict[str, dict[str, Any]] = {}
    for profile, name in doc["chosen"].items():
        if name is None:
            out[profile] = {"chosen": None}
            continue
        r = rows[name]
        lab = r["profiles"][profile]
        out[profile] = {
            "chosen": name,
            "accuracy_diff": r["accuracy"] - teacher_acc,
            "p50_ratio": lab["latency"]["p50_ms"] / lab["reference"]["p50_ms"],
            "p95_ratio": lab["latency_ratio"],
            "p50_ms": lab["latency"]["p50_ms"],
            "fp32_p50_ms": lab["reference"]["p50_ms"],
            "size_ratio": None if teacher_size is None else r["size_bytes"] / teacher_size,
        }
    return out


def _brief(c: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "status", "accuracy", "agreement", "ece", "size_bytes", "gzip_bytes")
    return {k: c[k] for k in keep} | {f"{p}_ratio": lab["latency_ratio"] for p, lab in c["profiles"].items()}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(sum(values) / len(values), 4), "spread": round(max(values) - min(values), 4)}


async def run(quick: bool = False) -> list[dict[str, Any]]:
    seeds = SEEDS[:1] if quick else SEEDS
    # fp32-l6 (the teacher itself) is always a candidate: its bytes are the size baseline.
    names = ("fp32-l6", *QUICK_CANDIDATES) if quick else None
    samples = 30 if quick else 100
    docs = [await anyio.to_thread.run_sync(_one_seed, s, names, samples) for s in seeds]
    per_seed = [_per_profile(d) for d in docs]
    results: list[dict[str, Any]] = []
    for profile in docs[0]["chosen"]:
        rows = [p[profile] for p in per_seed]
        got = [r for r in rows if r["chosen"] is not None]
        detail: dict[str, Any] = {"seeds": list(seeds), "chosen": [r["chosen"] for r in rows]}
        if got:
            for k in ("accuracy_diff", "p50_ratio", "p95_ratio"):
                detail[k] = _stats([r[k] for r in got])
            sizes = [r["size_ratio"] for r in got if r["size_ratio"] is not None]
            if sizes:
                detail["size_ratio"] = _stats(sizes)
        results.append(
            {
                "scenario": f"optimize/{profile}",
                "project": round(sum(r["p50_ms"] for r in got) / len(got), 3) if got else None,
                "baseline": round(sum(r["fp32_p50_ms"] for r in got) / len(got), 3) if got else None,
                "ratio": detail.get("p50_ratio", {}).get("mean"),
                "units": "ms p50 batch 1 (chosen variant vs L6 fp32, same run)",
                **detail,
            }
        )
    results.append(
        {
            "scenario": "optimize/candidates",
            "project": len(docs[0]["candidates"]),
            "baseline": None,
            "ratio": None,
            "units": "candidates per seed",
            "per_seed": [
                {
                    "seed": d["teacher"]["seed"],
                    "teacher_accuracy": d["teacher"]["accuracy"],
                    "candidates": [_brief(c) for c in d["candidates"]],
                }
                for d in docs
            ],
        }
    )
    return results
