"""Model factory: corpus selection and split, deterministic training, held-out accuracy well
above the majority class, a consistent reference profile and passing smoke tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.build import BuildReport, build, factory_split
from slmops.cloud.factory.corpus import load_topics, split_topics
from slmops.shared.bundle import TrustStore, check_hash, read_bundle
from slmops.shared.runtime import load_session

CREATED = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Built:
    key: Ed25519PrivateKey
    report: BuildReport


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    key = Ed25519PrivateKey.generate()
    out = tmp_path_factory.mktemp("factory") / "b"
    return Built(key, build(out, key, version=3, seed=0, created=CREATED))


def test_corpus_keeps_about_twelve_topics_of_distinct_utterances() -> None:
    topics = load_topics()
    assert 10 <= len(topics) <= 14
    assert all(len(texts) >= 40 for texts in topics.values())
    seen: dict[str, str] = {}
    for topic, texts in topics.items():
        assert len(set(texts)) == len(texts)
        for text in texts:
            assert seen.setdefault(text, topic) == topic, f"{text!r} is in {seen[text]} and {topic}"


def test_split_is_stratified_disjoint_and_deterministic_per_seed() -> None:
    topics = load_topics()
    a, b, c = (split_topics(topics, seed=s) for s in (7, 7, 8))
    assert a == b
    assert a.held_out_texts != c.held_out_texts
    assert not set(a.train_texts) & set(a.held_out_texts)
    for index, topic in enumerate(a.labels):
        held = a.held_out_labels.count(index)
        assert held == max(1, round(len(topics[topic]) * 0.25))
        assert held + a.train_labels.count(index) == len(topics[topic])
    assert 0.25 < a.majority_accuracy < 0.4


def test_same_seed_gives_the_same_model_bytes_and_another_seed_does_not(built: Built, tmp_path: Path) -> None:
    again = build(tmp_path / "again", built.key, version=3, seed=0, created=CREATED)
    other = build(tmp_path / "other", built.key, version=3, seed=1, created=CREATED)
    assert again.bundle.model_path.read_bytes() == built.report.bundle.model_path.read_bytes()
    assert again.bundle.manifest.sha256 == built.report.bundle.manifest.sha256
    assert again.accuracy == built.report.accuracy
    assert other.bundle.manifest.sha256 != built.report.bundle.manifest.sha256


def test_held_out_accuracy_is_well_above_the_majority_class(built: Built) -> None:
    r = built.report
    assert r.accuracy >= 0.6
    assert r.accuracy >= r.majority_accuracy + 0.25
    assert r.train_seconds < 30  # "seconds on 2 cores"; generous so a loaded CI box passes


def test_bundle_is_signed_hashed_and_passes_its_own_smoke_tests(built: Built) -> None:
    bundle = read_bundle(built.report.bundle.path)
    TrustStore([built.key.public_key()]).verify(bundle.manifest)
    check_hash(bundle)
    m = bundle.manifest
    assert (m.name, m.version, m.variant, m.parent_version) == ("topics", 3, "fp32", None)
    assert m.min_memory_mb > 0
    session = load_session(bundle.model_path, m)
    session.smoke_test()
    assert len({t.label for t in m.smoke_tests}) >= len(m.labels) - 2
    for t in m.smoke_tests:
        assert len(t.probs) == len(m.labels)
        assert t.probs[m.labels.index(t.label)] == max(t.probs)


def test_reference_profile_describes_the_held_out_predictions(built: Built) -> None:
    m = built.report.bundle.manifest
    ref = m.reference
    assert ref is not None
    n = built.report.held_out_size
    assert ref.count == n
    assert sum(ref.class_counts.values()) == n
    assert ref.confidence.total == n
    assert ref.confidence.edges == m.edges.confidence
    assert ref.input_length.total == n
    assert ref.input_length.edges == m.edges.input_length
    assert ref.latency_ms is not None
    assert ref.latency_ms.edges == m.edges.latency_ms
    assert ref.latency_ms.total == min(200, n)
    assert ref.accuracy == built.report.accuracy
    diagonal = sum(row.get(label, 0) for label, row in ref.confusion.items())
    assert diagonal == round(ref.accuracy * n)
    predicted: dict[str, int] = {}
    for row in ref.confusion.values():
        for label, count in row.items():
            predicted[label] = predicted.get(label, 0) + count
    assert predicted == ref.class_counts
    for label, row in ref.confusion.items():
        assert sum(row.values()) == round(ref.priors[label] * n)
    assert abs(sum(ref.priors.values()) - 1.0) < 1e-9
    assert ref.held_out is not None
    assert len(ref.held_out.true) == len(ref.held_out.probs) == len(ref.held_out.lengths) == n


def test_factory_split_recovers_the_training_split_from_the_manifest(built: Built) -> None:
    split = factory_split(built.report.bundle.manifest)
    assert split is not None
    assert split == split_topics(load_topics(), seed=0)
    session = load_session(built.report.bundle.model_path, built.report.bundle.manifest)
    preds = session.predict(split.held_out_texts)
    correct = sum(p.index == t for p, t in zip(preds, split.held_out_labels, strict=True))
    assert correct / len(preds) == built.report.accuracy


def test_build_refuses_bad_arguments(built: Built, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version"):
        build(tmp_path / "x", built.key, version=0)
    with pytest.raises(ValueError, match="model name"):
        build(tmp_path / "y", built.key, name="bad name!")
    with pytest.raises(ValueError, match="not empty"):
        build(built.report.bundle.path, built.key)
