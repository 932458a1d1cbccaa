"""Label-shift recalibration from aggregates alone (docs/architecture.md §7).

When the class priors of the traffic move from the reference priors π to estimated priors π',
Bayes' rule gives p'(y|x) ∝ p(y|x)·π'(y)/π(y) (Saerens et al. 2002): for a softmax classifier
that is the output bias shifted by log(π'/π). The new version is the same graph with that bias
(for a transformer bundle: ``b`` of its small ``head.onnx``, encoder and tokenizer files
unchanged, so a node that holds them downloads only the head),
a reference profile re-derived exactly from the held-out scores the factory stored (each
example's probabilities reweighted and each example weighted by π'/π of its true class), and
smoke tests re-derived from the new model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import numpy_helper

from slmops.cloud.errors import CloudError
from slmops.shared.bundle import Bundle, FileData, write_bundle
from slmops.shared.histogram import Histogram
from slmops.shared.messages import HeldOutScores, ModelManifest, ReferenceProfile, SmokeTest
from slmops.shared.runtime import Session, load_session

__all__ = ["RecalibrationError", "log_prior_ratio", "recalibrate_bundle", "shift_bias"]

#: Priors are floored before the log ratio: a class the estimate puts at ~0 must not get an
#: infinite negative bias (it would never be predicted again, even if it comes back).
PRIOR_FLOOR = 1e-3
#: Weight resolution of the re-derived reference histograms (counts stay integers).
_WEIGHT_SCALE = 100


class RecalibrationError(CloudError):
    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"cannot recalibrate {model}: {reason}")


def log_prior_ratio(manifest: ModelManifest, new_priors: Mapping[str, float]) -> npt.NDArray[np.float32]:
    """log(π'/π) per label, in the manifest's label order. Both sides are floored and
    renormalised; labels missing from ``new_priors`` keep their reference prior."""
    ref = manifest.reference
    if ref is None or not ref.priors:
        raise RecalibrationError(manifest.name, "the manifest has no reference priors")
    unknown = set(new_priors) - set(manifest.labels)
    if unknown:
        raise RecalibrationError(manifest.name, f"priors name unknown labels {sorted(unknown)}")
    old = np.array([max(ref.priors.get(label, 0.0), PRIOR_FLOOR) for label in manifest.labels])
    new = np.array(
        [max(new_priors.get(label, ref.priors.get(label, 0.0)), PRIOR_FLOOR) for label in manifest.labels]
    )
    if not np.all(np.isfinite(new)):
        raise RecalibrationError(manifest.name, f"priors are not finite: {dict(new_priors)!r}")
    ratio: npt.NDArray[np.float32] = np.log((new / new.sum()) / (old / old.sum())).astype(np.float32)
    return ratio


def shift_bias(model_bytes: bytes, delta: npt.NDArray[np.float32], *, bias_name: str = "b") -> bytes:
    """The same ONNX model with ``delta`` added to the output bias initializer."""
    model = onnx.load_from_string(model_bytes)
    for init in model.graph.initializer:
        if init.name == bias_name:
            bias = numpy_helper.to_array(init).astype(np.float32)
            if bias.shape != delta.shape:
                raise ValueError(f"bias has shape {bias.shape}, shift has {delta.shape}")
            init.CopyFrom(numpy_helper.from_array(bias + delta, bias_name))
            data: bytes = model.SerializeToString()
            return data
    raise ValueError(f"model has no initializer named {bias_name!r} (not a slmops classifier graph)")


def _reweighted_reference(
    manifest: ModelManifest,
    ref: ReferenceProfile,
    held: HeldOutScores,
    ratio: npt.NDArray[np.float32],
    new_priors: npt.NDArray[np.float64],
) -> ReferenceProfile:
    labels, edges = manifest.labels, manifest.edges
    probs = np.asarray(held.probs, dtype=np.float64) * np.exp(ratio.astype(np.float64))
    probs /= probs.sum(axis=1, keepdims=True)
    true = np.asarray(held.true)
    # Example weight π'(y)/π(y) of its true class: the held-out set as if drawn under π'.
    old_priors = np.array([max(ref.priors.get(label, 0.0), PRIOR_FLOOR) for label in labels])
    weights = np.rint(new_priors[true] / old_priors[true] * _WEIGHT_SCALE).astype(int)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    confidence = Histogram.empty(edges.confidence)
    length = Histogram.empty(edges.input_length)
    class_counts: dict[str, int] = {}
    confusion: dict[str, dict[str, int]] = {}
    correct = 0
    for i, w in enumerate(weights):
        w = int(w)
        confidence.add(float(conf[i]), w)
        length.add(float(held.lengths[i]), w)
        p_name, t_name = labels[int(pred[i])], labels[int(true[i])]
        class_counts[p_name] = class_counts.get(p_name, 0) + w
        row = confusion.setdefault(t_name, {})
        row[p_name] = row.get(p_name, 0) + w
        correct += w * int(pred[i] == true[i])
    total = int(weights.sum())
    return ReferenceProfile(
        count=total,
        class_counts=dict(sorted(class_counts.items())),
        confidence=confidence,
        input_length=length,
        latency_ms=ref.latency_ms,
        accuracy=correct / total if total else None,
        confusion=confusion,
        priors={label: float(p) for label, p in zip(labels, new_priors, strict=True)},
        source=f"recalibrated from version {manifest.version}",
        held_out=HeldOutScores(true=held.true, probs=np.round(probs, 6).tolist(), lengths=held.lengths),
    )


def recalibrate_bundle(
    bundle: Bundle,
    new_priors: Mapping[str, float],
    *,
    key: Ed25519PrivateKey,
    version: int,
    out_dir: Path,
) -> Bundle:
    """Write a new signed bundle: ``bundle``'s model with priors ``new_priors``, as ``version``.

    Raises ``RecalibrationError`` when the manifest lacks the reference priors or held-out
    scores this needs, or the new model fails its own smoke tests."""
    m = bundle.manifest
    if version <= m.version:
        raise ValueError(f"new version must be greater than {m.version}, got {version!r}")
    ratio = log_prior_ratio(m, new_priors)
    if m.reference is None or m.reference.held_out is None:
        raise RecalibrationError(m.name, "the manifest's reference has no held-out scores")
    head = bundle.file("head")
    new_model = shift_bias((head or bundle.model_path).read_bytes(), ratio)
    new_p = np.exp(
        np.log([max(m.reference.priors.get(label, 0.0), PRIOR_FLOOR) for label in m.labels]) + ratio
    )
    new_p = new_p / new_p.sum()
    reference = _reweighted_reference(m, m.reference, m.reference.held_out, ratio, new_p)
    shift = ", ".join(f"{label} {math.exp(float(r)):.2f}x" for label, r in zip(m.labels, ratio, strict=True))
    manifest = msgspec.structs.replace(
        m,
        version=version,
        parent_version=m.version,
        reference=reference,
        smoke_tests=[],
        created=datetime.now(UTC),
        notes=f"label-shift recalibration of version {m.version}: prior ratios {shift}",
        signature=None,
    )
    texts = [t.text for t in m.smoke_tests] or ["hello"]
    tolerance = max([1e-3, *(t.tolerance for t in m.smoke_tests)])  # int8 parents carry wider ones
    if head is None:
        # Smoke tests come from the new model itself, loaded from memory: the bundle is written once.
        session = load_session(new_model, manifest)
        manifest = msgspec.structs.replace(manifest, smoke_tests=_smoke(session, texts, tolerance))
        Session(session.ort, manifest).smoke_test()  # the rounded expectations still hold
        return write_bundle(out_dir, new_model, manifest, key)
    # A multi-file bundle: the files other than the head are copied as they are; the smoke
    # tests are re-derived from the written bundle, then the manifest is signed again.
    head_path = head.relative_to(bundle.path).as_posix()
    files = [
        FileData(f.path, new_model if f.path == head_path else bundle.path / f.path, f.role)
        for f in bundle.files
    ]
    draft = write_bundle(out_dir, files, manifest, key)
    session = load_session(draft)
    manifest = msgspec.structs.replace(
        draft.manifest, smoke_tests=_smoke(session, texts, tolerance), signature=None
    )
    final = write_bundle(out_dir, files, manifest, key)
    load_session(final).smoke_test()  # the rounded expectations still hold
    return final


def _smoke(session: Session, texts: list[str], tolerance: float) -> list[SmokeTest]:
    return [
        SmokeTest(text=text, label=p.label, probs=[round(x, 6) for x in p.probs], tolerance=tolerance)
        for text, p in zip(texts, session.predict(texts), strict=True)
    ]
