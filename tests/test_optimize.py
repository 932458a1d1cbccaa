"""``slmops models optimize`` (issue 12): each compression pass on the session's MiniLM default,
the accuracy-floor rule, and one end-to-end run that writes the table, the plot and a signed
variant per shipped profile which ``models test --profile`` accepts."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from slmops.cli import main
from slmops.cloud.factory import passes
from slmops.cloud.factory.cache import CachedModel
from slmops.cloud.factory.choice import choose
from slmops.cloud.factory.corpus import Split, load_topics, split_topics
from slmops.cloud.factory.lab import LabResult, Latency
from slmops.cloud.factory.minilm import embed
from slmops.cloud.factory.optimize import (
    OOV_SMOKE,
    AccuracyFloor,
    CandidateResult,
    CandidateSpec,
    expected_calibration_error,
)
from slmops.shared.bundle import TrustStore, load_public_key, read_bundle
from slmops.shared.runtime import load_session

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "deploy" / "profiles"


@pytest.fixture(scope="module")
def split() -> Split:
    return split_topics(load_topics(), seed=0)


@pytest.fixture(scope="module")
def state(minilm_default: CachedModel) -> passes.EncoderState:
    b = read_bundle(minilm_default.bundles["fp32"])
    enc, tok = b.file("model"), b.file("tokenizer")
    assert enc is not None
    assert tok is not None
    tensors, layers = passes.tensors_of(enc.read_bytes())
    return passes.EncoderState(tensors, layers, tok.read_bytes(), encoder=enc.read_bytes())


def _embed(state: passes.EncoderState, texts: list[str]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_bytes(state.tokenizer)
        return embed(state.encoder, passes.featurizer(path), texts)


def _tokens(state: passes.EncoderState, texts: list[str]) -> list[list[str]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(state.tokenizer.decode())
    tok.no_padding()
    tok.no_truncation()
    return [e.tokens for e in tok.encode_batch(texts)]


def test_tensors_read_back_rebuild_the_same_encoder(state: passes.EncoderState, split: Split) -> None:
    """The fp32 graph's initializers, read back into torch layout, write an encoder that gives
    the same embeddings as the bundle's."""
    assert state.layers == 6
    rebuilt = passes.encoder_of(state)
    texts = split.held_out_texts[:16]
    np.testing.assert_allclose(_embed(rebuilt, texts), _embed(state, texts), atol=1e-5)


def test_an_int8_teacher_is_refused(minilm_default: CachedModel) -> None:
    enc = read_bundle(minilm_default.bundles["int8"]).file("model")
    assert enc is not None
    with pytest.raises(ValueError, match="fp32 variant"):
        passes.tensors_of(enc.read_bytes())


def test_keep_layers_keeps_the_first_k(state: passes.EncoderState) -> None:
    two = passes.keep_layers(state, 2)
    assert two.layers == 2
    assert {int(n.split(".")[2]) for n in two.tensors if n.startswith("encoder.layer.")} == {0, 1}
    model = onnx.load_from_string(passes.encoder_of(two).encoder)
    assert not any(i.name.startswith("encoder.layer.2.") for i in model.graph.initializer)
    for bad in (0, 7):
        with pytest.raises(ValueError, match=r"layers to keep must be in 1\.\.6"):
            passes.keep_layers(state, bad)


def test_vocabulary_pruning_uses_training_text_and_keeps_every_word_tokenizable(
    state: passes.EncoderState, split: Split
) -> None:
    """Pruned to the training text's tokens + the character fallback: training texts tokenize
    and embed exactly as before, a held-out-only word is not kept (never chosen from the
    held-out set), out-of-vocabulary text still tokenizes, and [UNK] appears exactly where the
    full vocabulary gives it."""
    small = passes.prune_vocabulary(passes.keep_layers(state, 1), split.train_texts)
    full = passes.keep_layers(state, 1)
    assert 2000 < small.vocab_size < 30522 // 4
    assert _tokens(small, split.train_texts[:50]) == _tokens(full, split.train_texts[:50])
    np.testing.assert_allclose(
        _embed(passes.encoder_of(small), split.train_texts[:16]),
        _embed(passes.encoder_of(full), split.train_texts[:16]),
        atol=1e-5,
    )
    common = passes.prune_vocabulary(full, split.train_texts, keep_first=5000)
    assert common.vocab_size > small.vocab_size
    full_vocab = json.loads(full.tokenizer)["model"]["vocab"]
    kept = json.loads(common.tokenizer)["model"]["vocab"]
    assert {t for t, i in full_vocab.items() if i < 5000} <= set(kept)
    vocab = json.loads(small.tokenizer)["model"]["vocab"]
    train_tokens = {t for row in _tokens(full, split.train_texts) for t in row}
    held_only = {t for row in _tokens(full, split.held_out_texts) for t in row} - train_tokens
    held_only_words = {t for t in held_only if len(t) > 1 and not t.startswith("##")}
    assert held_only_words, "the held-out split has words the training split lacks"
    assert not held_only_words & set(vocab)
    hostile = [*OOV_SMOKE, "naïve café 日本語 😀", "Quokkapalooza!!", "x" * 300]
    got, want = _tokens(small, hostile), _tokens(full, hostile)
    for g, w in zip(got, want, strict=True):
        assert g.count("[UNK]") == w.count("[UNK]")
        assert "".join(g).replace("##", "") == "".join(w).replace("##", "")


def test_int8_passes_shrink_the_encoder_and_keep_its_embeddings(
    state: passes.EncoderState, split: Split
) -> None:
    base = passes.encoder_of(passes.keep_layers(state, 1))
    dyn = passes.dynamic_int8(base)
    qdq = passes.static_int8(base, split.train_texts[:32])
    texts = split.held_out_texts[:16]
    ref = _embed(base, texts)
    for q in (dyn, qdq):
        assert len(q.encoder) < len(base.encoder) / 3
        cos = np.sum(_embed(q, texts) * ref, axis=1)  # embeddings are L2-normalised
        assert cos.min() > 0.9, cos
    ops = {n.op_type for n in onnx.load_from_string(qdq.encoder).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with pytest.raises(ValueError, match="calibration"):
        passes.static_int8(base, [])
    with pytest.raises(ValueError, match="encoder_of"):
        passes.dynamic_int8(passes.keep_layers(state, 1))


def test_head_refit_and_ngram_student(state: passes.EncoderState, split: Split) -> None:
    """The refit head classifies the final encoder's embeddings above the majority class; the
    n-gram student learns the labels it is given (the teacher's), not the corpus's."""
    one = passes.dynamic_int8(passes.encoder_of(passes.keep_layers(state, 1)))
    w, b = passes.refit_head(one, split)
    assert w.shape == (384, len(split.labels))
    assert b.shape == (len(split.labels),)
    pred = (_embed(one, split.held_out_texts) @ w + b).argmax(1)
    assert np.mean(pred == np.asarray(split.held_out_labels)) > split.majority_accuracy + 0.3
    shifted = [(y + 1) % len(split.labels) for y in split.train_labels]
    student = passes.ngram_student(split, shifted, seed=0)
    from slmops.cloud.factory.build import _design_matrix

    x = _design_matrix(split.train_texts, student.preprocessing)
    logits = np.asarray(x @ student.embedding) @ student.weight + student.bias
    assert np.mean(logits.argmax(1) == np.asarray(shifted)) > 0.6
    with pytest.raises(ValueError, match="one teacher label per training text"):
        passes.ngram_student(split, shifted[:-1], seed=0)


def test_expected_calibration_error() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probs, [0, 0, 0, 1]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), [0]) == 0.0


def test_unknown_pass_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown pass 'prune-heads'"):
        CandidateSpec("x", ("prune-heads",))
    with pytest.raises(ValueError, match="unknown pass 'layers'"):
        CandidateSpec("x", ("layers",))
    with pytest.raises(ValueError, match="unknown pass 'head:3'"):
        CandidateSpec("x", ("head:3",))
    assert CandidateSpec("x", ("vocab:15000", "vocab")).chain == ("vocab:15000", "vocab")


def _lab(profile: str, ok: bool) -> LabResult:
    lat = Latency(p50_ms=1.0, p95_ms=1.0, batch32_p50_ms=5.0)
    return LabResult(
        profile=profile, bundle="b", variant="v", cpus=[0], threads=1, smoke_ok=True, smoke_error="",
        latency=lat, reference=lat, latency_ratio=1.0, latency_factor=1.0, peak_rss_mb=100.0,
        model_memory_mb=256, size_mb=1.0, model_disk_mb=64, memory_method="rss",
        failures=[] if ok else ["latency: too slow"],
    )  # fmt: skip


def _result(
    name: str, accuracy: float, size: int, fits: dict[str, bool], status: str = "ok"
) -> CandidateResult:
    r = CandidateResult(CandidateSpec(name, ()), status=status, accuracy=accuracy, size_bytes=size)
    r.lab = {p: _lab(p, ok) for p, ok in fits.items()}
    return r


def test_floor_rule_and_budgets_decide_the_choice() -> None:
    """Per profile the most accurate candidate that fits; one under the floor is never chosen,
    even when it is the only one that fits; ties go to the smaller bundle."""
    big = _result("big", 0.82, 90, {"till": False, "tablet": False, "gateway": True})
    mid = _result("mid", 0.81, 20, {"till": False, "tablet": True, "gateway": True})
    mid_small = _result("mid-small", 0.81, 10, {"till": False, "tablet": True, "gateway": True})
    tiny = _result("tiny", 0.70, 1, {"till": True, "tablet": True, "gateway": True})
    broken = _result("broken", 0.99, 1, {"till": True, "tablet": True, "gateway": True}, status="failed")
    floor = AccuracyFloor(max_drop=0.02).value(0.82)
    assert floor == pytest.approx(0.80)
    got = choose([big, mid, mid_small, tiny, broken], ["till", "tablet", "gateway"], floor)
    assert {p: (r.spec.name if r else None) for p, r in got.items()} == {
        "till": None,
        "tablet": "mid-small",
        "gateway": "big",
    }
    lenient = choose([big, tiny], ["till"], AccuracyFloor(max_drop=0.2).value(0.82))
    assert lenient["till"] is tiny
    assert AccuracyFloor(max_drop=0.2, min_accuracy=0.75).value(0.82) == 0.75
    with pytest.raises(ValueError, match=r"0\.\.1"):
        AccuracyFloor(max_drop=-0.1)


def test_optimize_end_to_end(minilm_default: CachedModel, tmp_path: Path) -> None:
    """A small candidate set through the CLI: the report (json, markdown table, PNG plot), one
    signed variant per shipped profile carrying its chain and figures, torch distillation
    skipped with a note, and the variant accepted by ``models test`` under its profile.

    The shipped profiles with every latency factor at least 1.5: with 20 calls a p95 is the
    2nd slowest, and one stall of this shared host broke the till's 0.25 for a 1-layer int8
    model that measures 0.12 in a quiet run; the budget rule itself is tested above."""
    fp32 = str(minilm_default.bundles["fp32"])
    out = tmp_path / "opt"
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for f in PROFILES.glob("*.toml"):
        text = f.read_text()
        factor = re.search(r"^latency_factor = ([0-9.]+)", text, re.M)
        assert factor is not None
        relaxed = max(1.5, float(factor.group(1)))
        (profiles / f.name).write_text(text.replace(factor.group(0), f"latency_factor = {relaxed}"))
    args = [
        "models", "optimize", fp32, "--profiles", str(profiles), "--out", str(out),
        "--key", str(minilm_default.key_path), "--candidates", "int8-l1-vocab,distill-l3",
        "--max-drop", "0.25", "--samples", "20", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    doc = json.loads(result.stdout)
    assert result.exit_code == 0, [(r["name"], r["profiles"]) for r in doc["candidates"]]
    assert doc == json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in doc["candidates"]}
    assert rows["distill-l3"]["status"] == "skipped"
    assert "torch" in rows["distill-l3"]["note"]
    small = rows["int8-l1-vocab"]
    assert small["status"] == "ok"
    assert set(small["profiles"]) == {"till", "tablet", "gateway"}
    assert small["size_bytes"] < 10e6
    assert 0 < small["gzip_bytes"] < small["size_bytes"]
    assert 0.5 < small["accuracy"] <= 1.0
    assert small["wins"] + small["losses"] > 0
    assert doc["chosen"] == {"till": "int8-l1-vocab", "tablet": "int8-l1-vocab", "gateway": "int8-l1-vocab"}
    table = (out / "report.md").read_text()
    picked = ", ".join(doc["profiles"])
    assert f"| **int8-l1-vocab** ({picked}) | layers:1 → vocab → int8-dynamic → head |" in table
    assert "skipped: distillation needs torch" in table
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    trust = TrustStore([load_public_key(minilm_default.pub_path)])
    for profile in ("till", "tablet", "gateway"):
        b = read_bundle(out / profile)
        trust.verify(b)
        m = b.manifest
        assert m.variant == profile
        assert m.optimization is not None
        assert m.optimization.profile == profile
        assert m.optimization.chain == ["layers:1", "vocab", "int8-dynamic", "head"]
        assert m.optimization.accuracy == small["accuracy"]
        assert m.optimization.teacher_accuracy == doc["teacher"]["accuracy"]
        assert m.min_memory_mb >= m.optimization.peak_rss_mb
        assert any(t.text in OOV_SMOKE for t in m.smoke_tests), "an out-of-vocabulary smoke test"
        load_session(b).smoke_test()

    lab = CliRunner().invoke(
        main,
        ["models", "test", str(out / "till"), "--profile", "till", "--profiles", str(profiles),
         "--reference", fp32, "--samples", "20", "--json"],
    )  # fmt: skip
    assert lab.exit_code == 0, lab.output


def test_bench_compares_the_chosen_variant_with_fp32() -> None:
    """``bench optimize`` per profile: paired accuracy difference, p50/p95 latency and size
    ratios of the chosen candidate against the teacher's row (fp32-l6) of the same report."""
    from slmops.bench.optimize import _per_profile, _stats

    def lab(p50: float, ref50: float, ratio: float) -> dict[str, object]:
        return {"latency": {"p50_ms": p50}, "reference": {"p50_ms": ref50}, "latency_ratio": ratio}

    doc = {
        "teacher": {"accuracy": 0.8},
        "chosen": {"till": "small", "gateway": "fp32-l6", "tablet": None},
        "candidates": [
            {
                "name": "fp32-l6",
                "accuracy": 0.8,
                "size_bytes": 100,
                "profiles": {"gateway": lab(10, 10, 1.0)},
            },
            {"name": "small", "accuracy": 0.79, "size_bytes": 20, "profiles": {"till": lab(2, 10, 0.25)}},
        ],
    }
    got = _per_profile(doc)
    assert got["tablet"] == {"chosen": None}
    assert got["till"]["accuracy_diff"] == pytest.approx(-0.01)
    assert (got["till"]["p50_ratio"], got["till"]["p95_ratio"], got["till"]["size_ratio"]) == (0.2, 0.25, 0.2)
    assert got["gateway"]["size_ratio"] == 1.0
    assert _stats([0.1, 0.3, 0.2]) == {"mean": 0.2, "spread": 0.2}
