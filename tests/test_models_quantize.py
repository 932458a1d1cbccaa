"""int8 variant: smaller, agreeing with fp32, signed, with smoke tests of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from _models import make_bundle
from slmops.cloud.factory.build import BuildReport, build, factory_split
from slmops.cloud.factory.quantize import QuantizeReport, quantize
from slmops.shared.bundle import TrustStore, check_hash, read_bundle
from slmops.shared.preprocess import featurize
from slmops.shared.runtime import load_session


@dataclass
class Pair:
    key: Ed25519PrivateKey
    fp32: BuildReport
    int8: QuantizeReport
    texts: list[str]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    key = Ed25519PrivateKey.generate()
    root = tmp_path_factory.mktemp("quantize")
    fp32 = build(root / "fp32", key, version=2, seed=0)
    split = factory_split(fp32.bundle.manifest)
    assert split is not None
    texts = split.held_out_texts + split.train_texts
    int8 = quantize(
        fp32.bundle.path,
        root / "int8",
        key,
        eval_texts=texts,
        held_out=(split.held_out_texts, split.held_out_labels),
    )
    return Pair(key, fp32, int8, texts)


def test_int8_is_much_smaller_and_agrees_with_fp32(pair: Pair) -> None:
    r = pair.int8
    assert r.int8_bytes == r.bundle.model_path.stat().st_size
    assert r.fp32_bytes == pair.fp32.bundle.model_path.stat().st_size
    assert r.size_ratio < 0.35
    assert r.agreement >= 0.99
    assert r.max_prob_diff < 0.05
    assert r.fp32_us > 0
    assert r.int8_us > 0
    # The report's figures are what the two models really do.
    fp32 = load_session(pair.fp32.bundle.model_path, pair.fp32.bundle.manifest)
    int8 = load_session(r.bundle.model_path, r.bundle.manifest)
    a, _ = fp32.probs(pair.texts)
    b, _ = int8.probs(pair.texts)
    assert float((a.argmax(1) == b.argmax(1)).mean()) == r.agreement
    assert float(np.abs(a - b).max()) == pytest.approx(r.max_prob_diff)


def test_int8_manifest_names_its_parent_and_is_signed(pair: Pair) -> None:
    b = read_bundle(pair.int8.bundle.path)
    m, parent = b.manifest, pair.fp32.bundle.manifest
    TrustStore([pair.key.public_key()]).verify(m)
    check_hash(b)
    assert (m.name, m.version, m.variant, m.parent_version) == (parent.name, 2, "int8", 2)
    assert 0 < m.min_memory_mb < parent.min_memory_mb
    assert m.labels == parent.labels
    assert m.preprocessing == parent.preprocessing
    assert m.edges == parent.edges


def test_int8_smoke_tests_come_from_the_int8_model(pair: Pair) -> None:
    m = pair.int8.bundle.manifest
    int8 = load_session(pair.int8.bundle.model_path, m)
    int8.smoke_test()
    feeds = featurize([t.text for t in m.smoke_tests], m.preprocessing).feeds()
    (probs,) = int8.ort.run(["probs"], feeds)
    for t, p in zip(m.smoke_tests, probs, strict=True):
        assert np.abs(np.asarray(t.probs) - p).max() < 1e-5
    # fp32's expected probabilities would not all hold within int8's own tests' tolerance.
    fp32_tests = {t.text: t.probs for t in pair.fp32.bundle.manifest.smoke_tests}
    diffs = [
        np.abs(np.asarray(fp32_tests[t.text]) - t.probs).max() for t in m.smoke_tests if t.text in fp32_tests
    ]
    assert diffs
    assert max(diffs) > 1e-5


def test_int8_reference_profile_is_measured_on_int8(pair: Pair) -> None:
    ref, parent_ref = pair.int8.bundle.manifest.reference, pair.fp32.bundle.manifest.reference
    assert ref is not None
    assert parent_ref is not None
    assert ref.count == parent_ref.count
    assert ref.accuracy is not None
    assert parent_ref.accuracy is not None
    assert abs(ref.accuracy - parent_ref.accuracy) <= 0.02
    assert ref.held_out is not None
    assert parent_ref.held_out is not None
    assert ref.held_out.probs != parent_ref.held_out.probs


def test_quantize_refuses_an_int8_parent_and_a_used_output_dir(pair: Pair, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp32"):
        quantize(pair.int8.bundle.path, tmp_path / "x", pair.key, eval_texts=["hi"])
    with pytest.raises(ValueError, match="not empty"):
        quantize(pair.fp32.bundle.path, pair.int8.bundle.path, pair.key, eval_texts=["hi"])


def test_quantize_works_on_a_bundle_from_elsewhere(tmp_path: Path) -> None:
    """A non-factory bundle keeps its (absent) reference; smoke tests are re-derived."""
    key = Ed25519PrivateKey.generate()
    parent = make_bundle(tmp_path / "p", key)
    r = quantize(parent.path, tmp_path / "q", key, eval_texts=[t.text for t in parent.manifest.smoke_tests])
    assert r.bundle.manifest.reference is None
    assert r.agreement == 1.0
    load_session(r.bundle.model_path, r.bundle.manifest).smoke_test()
