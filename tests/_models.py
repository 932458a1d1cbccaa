"""Small, deterministic ONNX text-classifier bundles for tests (no training needed).

Each label has a keyword; the embedding makes a text containing a label's keyword score that
label, so tests can drive known class mixes through a real ORT session."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.build import classifier_manifest
from slmops.cloud.factory.graph import build_classifier
from slmops.shared.bundle import Bundle, write_bundle
from slmops.shared.messages import HistogramEdges, Preprocessing, SmokeTest
from slmops.shared.preprocess import featurize

LABELS = ["alpha", "beta", "gamma"]
EDGES = HistogramEdges(
    confidence=[0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
    input_length=[0, 2, 4, 8, 16, 32, 64, 1_000_000],
    latency_ms=[0, 0.5, 1, 2, 5, 10, 20, 50, 100, 1_000_000],
)
PP = Preprocessing(buckets=1024, max_tokens=32, word_ngrams=[1], char_ngrams=[])


def make_bundle(
    out: Path,
    key: Ed25519PrivateKey,
    *,
    version: int = 1,
    labels: list[str] | None = None,
    bias: list[float] | None = None,
    name: str = "testclf",
    variant: str = "fp32",
) -> Bundle:
    labels = labels or LABELS
    n, dim = len(labels), 8
    rng = np.random.default_rng(1234)
    emb = rng.normal(0, 0.05, (PP.buckets, dim)).astype(np.float32)
    emb[0] = 0
    w = np.zeros((dim, n), dtype=np.float32)
    for c, label in enumerate(labels):
        w[c % dim, c] = 1.0
        bucket = 1 + zlib.crc32(label.encode()) % (PP.buckets - 1)
        emb[bucket, c % dim] += 6.0
    b = np.array(bias if bias is not None else [0.0] * n, dtype=np.float32)
    model = build_classifier(emb, w, b, max_tokens=PP.max_tokens, name=name)

    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    texts = [f"some words about {label}" for label in labels]
    (probs,) = sess.run(["probs"], featurize(texts, PP).feeds())
    smoke = [
        SmokeTest(text=t, label=labels[int(p.argmax())], probs=[float(x) for x in p], tolerance=1e-4)
        for t, p in zip(texts, probs, strict=True)
    ]
    manifest = classifier_manifest(
        name=name, version=version, labels=labels, preprocessing=PP, edges=EDGES, variant=variant
    )
    manifest.smoke_tests = smoke
    return write_bundle(out, model, manifest, key)
