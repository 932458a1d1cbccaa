"""``slmops bench recalibration``: how much accuracy label-shift recalibration gives back.

The factory's default model (seed 0) on its held-out texts. For each topic in turn, a shifted
traffic mix: half that topic, half the held-out mix (3000 texts drawn with replacement, seeded).
Measured per shift, against the labels the bench knows:

* ``baseline``: the unchanged model on the shifted traffic;
* ``project``: the version ``cloud.recalibrate`` builds from the priors the cloud estimates
  (EM on the predicted-class counts, ``cloud.drift.labelshift``: what a drift event carries);
* details: accuracy before the shift, the recalibration with the true priors (the ceiling of
  any estimator), the estimate's L1 error, and whether the result is within 2 points of the
  accuracy before the shift.

One result per shift plus the mean over all of them; ratio = project / baseline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["run"]


def _measure(quick: bool) -> list[dict[str, Any]]:
    from slmops.cloud.drift.labelshift import confusion_matrix, em_priors
    from slmops.cloud.factory.build import build, factory_split
    from slmops.cloud.recalibration.recalibrate import recalibrate_bundle
    from slmops.shared.runtime import load_session

    key = Ed25519PrivateKey.generate()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmops-bench-recal-") as tmp:
        bundle = build(Path(tmp) / "v1", key, seed=0).bundle
        m = bundle.manifest
        assert m.reference is not None
        split = factory_split(m)
        if split is None:
            raise RuntimeError("the factory bundle's labels are not the corpus topics")
        texts, truth = split.held_out_texts, np.asarray(split.held_out_labels)
        k = len(m.labels)
        probs, _ = load_session(bundle.model_path, m).probs(texts)
        pred = probs.argmax(axis=1)
        before = float((pred == truth).mean())
        prior = np.bincount(truth, minlength=k) / len(truth)
        joint = confusion_matrix(m.labels, m.reference.confusion, m.reference.accuracy)
        n = 600 if quick else 3000
        rng = np.random.default_rng(7)
        targets = range(3) if quick else range(k)
        for t in targets:
            mix = 0.5 * prior
            mix[t] += 0.5
            idx = np.concatenate(
                [
                    rng.choice(np.flatnonzero(truth == c), size=round(n * mix[c]), replace=True)
                    for c in range(k)
                ]
            )
            shifted = float((pred[idx] == truth[idx]).mean())
            counts = np.bincount(pred[idx], minlength=k).astype(float)
            est = em_priors(list(counts), joint)
            new = recalibrate_bundle(
                bundle, dict(zip(m.labels, est, strict=True)), key=key, version=2, out_dir=Path(tmp) / f"r{t}"
            )
            p2, _ = load_session(new.model_path, new.manifest).probs([texts[i] for i in idx])
            recal = float((p2.argmax(axis=1) == truth[idx]).mean())
            true_mix = np.bincount(truth[idx], minlength=k) / len(idx)
            w = np.maximum(true_mix, 1e-3) / np.maximum(prior, 1e-3)
            oracle = float(((probs[idx] * w).argmax(axis=1) == truth[idx]).mean())
            results.append(
                {
                    "scenario": f"recalibration/{m.labels[t]}",
                    "project": round(recal, 4),
                    "baseline": round(shifted, 4),
                    "ratio": round(recal / shifted, 4),
                    "units": "accuracy",
                    "before_shift": round(before, 4),
                    "true_priors": round(oracle, 4),
                    "prior_l1_error": round(float(np.abs(np.array(est) - true_mix).sum()), 4),
                    "within_2_points": recal >= before - 0.02,
                }
            )
    mean_p = float(np.mean([r["project"] for r in results]))
    mean_b = float(np.mean([r["baseline"] for r in results]))
    results.append(
        {
            "scenario": "recalibration/mean",
            "project": round(mean_p, 4),
            "baseline": round(mean_b, 4),
            "ratio": round(mean_p / mean_b, 4),
            "units": "accuracy",
            "before_shift": round(before, 4),
            "true_priors": round(float(np.mean([r["true_priors"] for r in results])), 4),
            "within_2_points": f"{sum(bool(r['within_2_points']) for r in results)}/{len(results)}",
        }
    )
    return results


async def run(quick: bool = False) -> list[dict[str, Any]]:
    return await anyio.to_thread.run_sync(_measure, quick)
