"""Label shift: new class priors from predicted-class counts, and accuracy without labels.

Both estimators need how predictions relate to true classes on the reference: the manifest's
held-out confusion (``ReferenceProfile.confusion``, true → predicted → count). Without one, a
symmetric confusion is assumed from the reference accuracy (each class right with probability
``a``, wrong ones spread evenly) — cruder, and the event says which was used.

* ``em_priors``: the EM of Saerens, Latinne & Decaestecker (2002) on the predictor discretised
  to its predicted class: posteriors ``P(y | ŷ)`` from the reference are re-weighted by
  ``new prior / reference prior`` until the priors stop moving. This is maximum-likelihood
  label-shift estimation on the aggregate (Garg et al. 2020) and always stays on the simplex.
* ``bbse_priors``: black-box shift estimation (Lipton et al. 2018): solve ``C p = q`` for the
  priors ``p`` with non-negative least squares, then renormalise.
* ``expected_accuracy``: difference of confidences (Guillory et al. 2021): reference accuracy
  plus the change in mean confidence; the mean confidence itself when the reference has no
  accuracy.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

__all__ = ["bbse_priors", "confusion_matrix", "em_priors", "expected_accuracy"]


def confusion_matrix(
    labels: list[str],
    confusion: dict[str, dict[str, int]] | None,
    accuracy: float | None,
) -> np.ndarray:
    """Joint counts ``J[pred, true]`` (rows: predicted, columns: true), smoothed.

    From the manifest's confusion when it has one, else a symmetric one built from
    ``accuracy`` (0.8 when unknown) with uniform priors.
    """
    k = len(labels)
    if k < 2:
        raise ValueError(f"label shift needs at least 2 labels, got {labels!r}")
    if confusion:
        # Smoothing keeps every cell positive; it must stay small next to the counts. With the
        # default model's 413 held-out examples over 12x12 cells, 0.5 per cell (72 pseudo
        # counts) biased EM to an L1 prior error of 0.25 on 3000-sample shifts; 0.05 gave 0.07.
        joint = np.full((k, k), 0.05)
        index = {label: i for i, label in enumerate(labels)}
        for truth, predicted in confusion.items():
            j = index.get(truth)
            if j is None:
                continue
            for label, c in predicted.items():
                i = index.get(label)
                if i is not None and c > 0:
                    joint[i, j] += c
        return joint
    a = 0.8 if accuracy is None else min(max(accuracy, 1.0 / k), 0.999)
    joint = np.full((k, k), (1 - a) / (k - 1))
    np.fill_diagonal(joint, a)
    return joint * 1000.0


def em_priors(
    predicted: list[float], joint: np.ndarray, *, tol: float = 1e-8, max_iter: int = 1000
) -> list[float]:
    """Saerens' EM on predicted-class counts; returns the estimated true-class priors."""
    q = np.clip(np.asarray(predicted, dtype=np.float64), 0, None)
    if q.sum() <= 0:
        raise ValueError("no predicted counts to estimate priors from")
    q = q / q.sum()
    ref_prior = joint.sum(axis=0) / joint.sum()
    post = joint / joint.sum(axis=1, keepdims=True)  # P(true | pred) on the reference
    p = ref_prior.copy()
    for _ in range(max_iter):
        w = post * (p / ref_prior)
        w /= w.sum(axis=1, keepdims=True)
        new = q @ w
        if np.abs(new - p).sum() < tol:
            p = new
            break
        p = new
    return [float(x) for x in p / p.sum()]


def bbse_priors(predicted: list[float], joint: np.ndarray) -> list[float]:
    """BBSE: priors ``p`` with ``C p ≈ q``, ``p ≥ 0``, ``Σp = 1`` (NNLS with a sum row)."""
    q = np.clip(np.asarray(predicted, dtype=np.float64), 0, None)
    if q.sum() <= 0:
        raise ValueError("no predicted counts to estimate priors from")
    q = q / q.sum()
    cond = joint / joint.sum(axis=0, keepdims=True)  # P(pred | true)
    k = cond.shape[0]
    weight = 10.0  # how hard the sum-to-one row is enforced
    a = np.vstack([cond, np.full((1, k), weight)])
    b = np.concatenate([q, [weight]])
    p, _ = nnls(a, b)
    total = p.sum()
    if total <= 0:
        return [1.0 / k] * k
    return [float(x) for x in p / total]


def expected_accuracy(
    mean_confidence: float | None, ref_mean_confidence: float | None, ref_accuracy: float | None
) -> float | None:
    """Accuracy expected from confidence alone (difference of confidences), clipped to [0, 1]."""
    if mean_confidence is None:
        return None
    if ref_accuracy is None or ref_mean_confidence is None:
        return min(max(mean_confidence, 0.0), 1.0)
    return min(max(ref_accuracy + mean_confidence - ref_mean_confidence, 0.0), 1.0)
