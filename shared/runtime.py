"""Running a bundle's model with ONNX Runtime: session creation, batched prediction through the
manifest's preprocessing, smoke tests. Shared by the edge (serving, refresh) and the cloud
(``models push`` verification, the factory)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from slmops.shared.errors import BundleError
from slmops.shared.messages import ModelManifest
from slmops.shared.preprocess import featurize

__all__ = ["Prediction", "Session", "load_session"]


class Prediction(msgspec.Struct, frozen=True):
    label: str
    index: int
    confidence: float
    probs: list[float]
    input_length: int


class Session:
    """An ONNX Runtime session bound to its manifest. ``predict`` is thread-safe (ORT's
    ``run`` is) and is meant to be called from a worker thread."""

    def __init__(self, session: ort.InferenceSession, manifest: ModelManifest) -> None:
        self.ort = session
        self.manifest = manifest
        self._output = manifest.outputs[-1].name if manifest.outputs else "probs"

    def probs(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.float32], list[int]]:
        feats = featurize(texts, self.manifest.preprocessing)
        (probs,) = self.ort.run([self._output], feats.feeds())
        return np.asarray(probs, dtype=np.float32), feats.lengths

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        probs, lengths = self.probs(texts)
        idx = probs.argmax(axis=1)
        labels = self.manifest.labels
        return [
            Prediction(
                label=labels[int(i)],
                index=int(i),
                confidence=float(p[i]),
                probs=p.tolist(),
                input_length=n,
            )
            for i, p, n in zip(idx, probs, lengths, strict=True)
        ]

    def smoke_test(self) -> float:
        """Run the manifest's smoke tests; raise ``BundleError(code='smoke_failed')`` on a
        mismatch. Returns the seconds the batch took (for the device-fit check)."""
        tests = self.manifest.smoke_tests
        if not tests:
            return 0.0
        t0 = time.perf_counter()
        preds = self.predict([t.text for t in tests])
        took = time.perf_counter() - t0
        for t, p in zip(tests, preds, strict=True):
            if p.label != t.label:
                raise BundleError(
                    self.manifest.name,
                    f"smoke test {t.text!r}: expected {t.label!r}, got {p.label!r}",
                    "smoke_failed",
                )
            diff = max(abs(a - b) for a, b in zip(p.probs, t.probs, strict=False)) if t.probs else 0.0
            if len(t.probs) not in (0, len(p.probs)) or diff > t.tolerance:
                raise BundleError(
                    self.manifest.name,
                    f"smoke test {t.text!r}: probabilities differ by {diff:.4g} > {t.tolerance}",
                    "smoke_failed",
                )
        return took


def load_session(model_path: Path | bytes, manifest: ModelManifest, *, intra_op_threads: int = 1) -> Session:
    """Load ``model_path`` (or the serialized model itself) and check its inputs/outputs
    against the manifest. Raises ``BundleError`` with code ``load_failed`` or ``incompatible``."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    where = "<in-memory model>" if isinstance(model_path, bytes) else str(model_path)
    source = model_path if isinstance(model_path, bytes) else str(model_path)
    try:
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types (Fail, InvalidGraph, RuntimeError)
        raise BundleError(where, f"ONNX Runtime cannot load the model: {exc}", "load_failed") from exc
    have_in = {i.name for i in sess.get_inputs()}
    want_in = {"ids", "weights"}
    if have_in != want_in or {t.name for t in manifest.inputs} != want_in:
        raise BundleError(
            where,
            f"model inputs {sorted(have_in)} are not the {sorted(want_in)} this runtime feeds",
            "incompatible",
        )
    have_out = {o.name for o in sess.get_outputs()}
    missing = {t.name for t in manifest.outputs} - have_out
    if missing:
        raise BundleError(
            where, f"model lacks outputs {sorted(missing)} named in the manifest", "incompatible"
        )
    out_shape = sess.get_outputs()[-1].shape
    if isinstance(out_shape[-1], int) and out_shape[-1] != len(manifest.labels):
        raise BundleError(
            where,
            f"model has {out_shape[-1]} classes, manifest has {len(manifest.labels)} labels",
            "incompatible",
        )
    return Session(sess, manifest)
