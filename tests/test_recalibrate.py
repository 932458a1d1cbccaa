"""Label-shift recalibration: the new model is the old one with priors swapped (Bayes' rule),
its reference reflects the new priors, and it is a valid signed bundle."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from _models import LABELS, make_bundle
from slmops.cloud.recalibration.recalibrate import RecalibrationError, log_prior_ratio, recalibrate_bundle
from slmops.shared.bundle import Bundle, TrustStore, check_hash, read_bundle, write_bundle
from slmops.shared.histogram import Histogram
from slmops.shared.messages import HeldOutScores, ReferenceProfile
from slmops.shared.runtime import load_session

TEXTS = ["alpha news", "beta things", "gamma rays", "plain words", "alpha beta", "nothing here"]
TRUE = [0, 1, 2, 0, 1, 2]


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _with_reference(tmp_path: Path, key: Ed25519PrivateKey) -> Bundle:
    b = make_bundle(tmp_path / "v1", key)
    session = load_session(b.model_path, b.manifest)
    preds = session.predict(TEXTS)
    edges = b.manifest.edges
    ref = ReferenceProfile(
        count=len(TEXTS),
        class_counts={},
        confidence=Histogram.of(edges.confidence, [p.confidence for p in preds]),
        input_length=Histogram.of(edges.input_length, [p.input_length for p in preds]),
        priors=dict.fromkeys(LABELS, 1 / 3),
        held_out=HeldOutScores(
            true=TRUE,
            probs=[[round(x, 6) for x in p.probs] for p in preds],
            lengths=[p.input_length for p in preds],
        ),
    )
    manifest = msgspec.structs.replace(b.manifest, reference=ref)
    return write_bundle(tmp_path / "v1ref", b.model_path.read_bytes(), manifest, key)


def test_recalibrated_model_applies_bayes_prior_correction(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    old = _with_reference(tmp_path, key)
    priors = {"alpha": 0.6, "beta": 0.3, "gamma": 0.1}
    new = recalibrate_bundle(old, priors, key=key, version=2, out_dir=tmp_path / "v2")
    p_old, _ = load_session(old.model_path, old.manifest).probs(TEXTS)
    p_new, _ = load_session(new.model_path, new.manifest).probs(TEXTS)
    w = np.array([0.6, 0.3, 0.1]) / (1 / 3)
    expected = p_old * w / (p_old * w).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p_new, expected, atol=1e-5)
    assert not np.allclose(p_new, p_old, atol=1e-3)


def test_recalibrated_bundle_is_signed_versioned_and_smoke_tested(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    old = _with_reference(tmp_path, key)
    new = read_bundle(
        recalibrate_bundle(old, {"alpha": 0.8}, key=key, version=5, out_dir=tmp_path / "v5").path
    )
    check_hash(new)
    TrustStore([key.public_key()]).verify(new.manifest)
    assert (new.manifest.version, new.manifest.parent_version) == (5, 1)
    load_session(new.model_path, new.manifest).smoke_test()
    assert not (tmp_path / "v5.unsmoked").exists()


def test_reference_reflects_the_new_priors(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    old = _with_reference(tmp_path, key)
    new = recalibrate_bundle(
        old, {"alpha": 0.7, "beta": 0.2, "gamma": 0.1}, key=key, version=2, out_dir=tmp_path / "v2"
    )
    ref = new.manifest.reference
    assert ref is not None
    assert ref.held_out is not None
    assert ref.priors == pytest.approx({"alpha": 0.7, "beta": 0.2, "gamma": 0.1})
    true_weight = {label: sum(row.values()) for label, row in ref.confusion.items()}
    total = sum(true_weight.values())
    assert true_weight["alpha"] / total == pytest.approx(0.7, abs=0.01)
    assert ref.confidence.total == ref.count == total


def test_missing_reference_is_a_clear_error(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    bare = make_bundle(tmp_path / "bare", key)
    with pytest.raises(RecalibrationError, match="reference priors"):
        recalibrate_bundle(bare, {"alpha": 0.5}, key=key, version=2, out_dir=tmp_path / "v2")


def test_unknown_label_in_priors_is_named(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    old = _with_reference(tmp_path, key)
    with pytest.raises(RecalibrationError, match="omega"):
        log_prior_ratio(old.manifest, {"omega": 0.5})
