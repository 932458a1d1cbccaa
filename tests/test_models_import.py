"""``slmops models import``: a model the test builds (tiny BERT-like graph + WordPiece
tokenizer) round-trips into a signed bundle a node accepts, and each kind of mismatch is
refused with one line naming the model input/output, the file or the data line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from _transformer import LABELS, encoder_onnx, single_classifier_onnx, tokenizer_json
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from slmops.cli import main
from slmops.cloud.factory.importer import ImportRefused, import_model
from slmops.shared.bundle import TrustStore, new_keypair, read_bundle
from slmops.shared.runtime import verify_bundle

HELD_OUT = [
    {"text": "some words about alpha", "label": "alpha"},
    {"text": "the beta", "label": "beta"},
    {"text": "a gamma text", "label": "gamma"},
    {"text": "alpha hello", "label": "alpha"},
    {"text": "beta beta world", "label": "beta"},
    {"text": "gamma", "label": "gamma"},
]


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _jsonl(path: Path, rows: list[Any]) -> Path:
    return _write(path, "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "onnx": _write(tmp_path / "model.onnx", single_classifier_onnx()),
        "tokenizer": _write(tmp_path / "tokenizer.json", tokenizer_json()),
        "data": _jsonl(tmp_path / "heldout.jsonl", HELD_OUT),
    }


def _import(files: dict[str, Path], key: Ed25519PrivateKey, out: Path, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "onnx_path": files["onnx"],
        "tokenizer_path": files["tokenizer"],
        "data_path": files["data"],
        "name": "byom",
        "version": 1,
        "key": key,
        "out_dir": out,
        "labels": list(LABELS),
    }
    args.update(kw)
    return import_model(**args)


def test_cli_import_round_trips_a_model_the_test_built(tmp_path: Path, files: dict[str, Path]) -> None:
    priv, pub = new_keypair(tmp_path / "keys", "t")
    out = tmp_path / "bundle"
    argv = [
        "models", "import", "--onnx", str(files["onnx"]), "--tokenizer", str(files["tokenizer"]),
        "--labels", ",".join(LABELS), "--data", str(files["data"]), "--name", "byom",
        "--version", "3", "--key", str(priv), "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert "output       logits (logits)" in result.output
    assert "accuracy 1.0000" in result.output
    b = read_bundle(out)
    m = b.manifest
    assert (m.name, m.version, m.task, m.output, m.output_kind) == (
        "byom",
        3,
        "classification",
        "logits",
        "logits",
    )
    assert sorted(f.path for f in m.files) == ["model.onnx", "tokenizer.json"]
    assert m.reference is not None
    assert m.reference.count == len(HELD_OUT)
    assert m.reference.accuracy == 1.0
    assert m.smoke_tests
    session = verify_bundle(b, TrustStore.from_files([pub]))
    assert [p.label for p in session.predict(["about gamma", "alpha"])] == ["gamma", "alpha"]


def test_a_probability_output_is_measured_as_probs(
    tmp_path: Path, files: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    model = onnx.load_from_string(single_classifier_onnx())
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3]))
    files["onnx"] = _write(tmp_path / "probs.onnx", model.SerializeToString())
    report = _import(files, key, tmp_path / "out")
    assert (report.output, report.output_kind) == ("probs", "probs")
    s = verify_bundle(read_bundle(tmp_path / "out"), TrustStore([key.public_key()]))
    assert np.allclose(s.run(["alpha"]).values.sum(), 1.0, atol=1e-5)


def test_an_embedding_model_imports_with_optional_labels(
    tmp_path: Path, files: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    files["onnx"] = _write(tmp_path / "enc.onnx", encoder_onnx())
    files["data"] = _jsonl(
        tmp_path / "texts.jsonl", [{"text": "alpha"}, {"text": "beta", "label": "b"}, {"text": ""}]
    )
    report = _import(files, key, tmp_path / "out", labels=None, task="embedding")
    m = report.bundle.manifest
    assert (m.task, m.output, m.output_kind, m.labels) == ("embedding", "embedding", "embedding", [])
    assert m.reference is not None
    assert m.reference.class_counts == {"b": 1}
    assert m.embedding is not None
    assert len(m.embedding.directions) == 4
    assert m.reference.embedding is not None
    assert [h.total for h in m.reference.embedding.projections] == [3] * 4
    assert m.reference.embedding.norm.total == 3
    s = verify_bundle(read_bundle(tmp_path / "out"), TrustStore([key.public_key()]))
    v = s.run(["alpha", "gamma"]).values
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_external_weights_ship_as_data_files(
    tmp_path: Path, files: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    model = onnx.load_from_string(single_classifier_onnx())
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(
        model,
        str(ext / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=1024,
    )
    files["onnx"] = ext / "model.onnx"
    report = _import(files, key, tmp_path / "out")
    assert {f.path: f.role for f in report.bundle.manifest.files} == {
        "model.onnx": "model",
        "tokenizer.json": "tokenizer",
        "weights.bin": "data",
    }
    verify_bundle(read_bundle(tmp_path / "out"), TrustStore([key.public_key()]))


def _renamed_input(old: str, new: str) -> bytes:
    model = onnx.load_from_string(single_classifier_onnx())
    for v in model.graph.input:
        if v.name == old:
            v.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    return model.SerializeToString()


def _input_changed(name: str, *, elem: int | None = None, length: int | None = None) -> bytes:
    model = onnx.load_from_string(single_classifier_onnx())
    for v in model.graph.input:
        if v.name == name:
            if elem is not None:
                v.type.tensor_type.elem_type = elem
            if length is not None:
                v.type.tensor_type.shape.dim[1].dim_value = length
    return model.SerializeToString()


def _rank3_output() -> bytes:
    model = onnx.load_from_string(encoder_onnx())
    model.graph.output.insert(0, helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", 16]))
    return model.SerializeToString()


CASES: dict[str, tuple[dict[str, Any], str]] = {
    "input not from the tokenizer": (
        {"onnx": _renamed_input("input_ids", "tokens")},
        "model.onnx: input 'tokens' is not one the tokenizer produces",
    ),
    "float input": (
        {"onnx": _input_changed("attention_mask", elem=TensorProto.FLOAT)},
        "model.onnx: input 'attention_mask' is FLOAT, the tokenizer produces int64 token ids",
    ),
    "fixed token axis": (
        {"onnx": _input_changed("input_ids", length=128)},
        "model.onnx: input 'input_ids' has a fixed length of 128 tokens",
    ),
    "output width vs labels": (
        {"labels": ["alpha", "beta"]},
        "model.onnx: output 'logits' has 3 values per text, --labels gives 2",
    ),
    "rank-3 output": (
        {"onnx": _rank3_output(), "task": "embedding", "labels": None},
        "model.onnx: output 'h' has shape ['batch', 'seq', 16], expected [batch, k] (a [batch, tokens, dim]",
    ),
    "tokenizer of another model": (
        {"tokenizer": tokenizer_json([*LABELS, "delta", "epsilon"])},
        "tokenizer.json: vocabulary of 20 tokens, but model.onnx input 'input_ids' indexes an embedding "
        "table of 18 rows",
    ),
    "not onnx": ({"onnx": b"not a model"}, "model.onnx: not a readable ONNX model"),
    "not a tokenizer": ({"tokenizer": b"{}"}, "tokenizer.json: not a readable tokenizers file"),
    "bad json line": (
        {"data": [HELD_OUT[0], HELD_OUT[1], '{"text": "x", ']},
        "heldout.jsonl line 3: not valid JSON",
    ),
    "label not in labels": (
        {"data": [HELD_OUT[0], {"text": "x", "label": "delta"}]},
        "heldout.jsonl line 2: label 'delta' is not one of --labels ['alpha', 'beta', 'gamma']",
    ),
    "line without text": ({"data": [{"label": "alpha"}]}, 'heldout.jsonl line 1: "text" must be a string'),
    "line without label": ({"data": [{"text": "alpha"}]}, 'heldout.jsonl line 1: "label" is missing'),
    "non-finite output": (
        {
            "onnx": single_classifier_onnx(nan_word="nanword"),
            "data": [*HELD_OUT[:3], {"text": "nanword", "label": "beta"}],
        },
        "heldout.jsonl line 4: model.onnx output 'logits' is not finite for this text",
    ),
    "more tokens than positions": (
        {"max_tokens": 1024},
        "model.onnx fails on a text of 1024 tokens (--max-tokens): [ONNXRuntimeError]",
    ),
    "no labels, no task": ({"labels": None}, "give --labels a,b,c (classification) or --task embedding"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mismatch_is_refused_with_one_line_naming_it(
    tmp_path: Path, files: dict[str, Path], key: Ed25519PrivateKey, case: str
) -> None:
    changes, message = CASES[case]
    kw: dict[str, Any] = {}
    for what, value in changes.items():
        if what in ("onnx", "tokenizer"):
            files[what] = _write(tmp_path / files[what].name, value)
        elif what == "data":
            files["data"] = _jsonl(tmp_path / "heldout.jsonl", value)
        else:
            kw[what] = value
    out = tmp_path / "out"
    with pytest.raises(ImportRefused) as info:
        _import(files, key, out, **kw)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text
    assert not out.exists() or not any(out.iterdir())


def test_cli_prints_the_refusal_on_one_line(tmp_path: Path, files: dict[str, Path]) -> None:
    priv, _ = new_keypair(tmp_path / "keys", "t")
    _jsonl(files["data"], [HELD_OUT[0], {"text": "x", "label": "delta"}])
    argv = [
        "models", "import", "--onnx", str(files["onnx"]), "--tokenizer", str(files["tokenizer"]),
        "--labels", ",".join(LABELS), "--data", str(files["data"]), "--name", "byom",
        "--version", "1", "--key", str(priv), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: heldout.jsonl line 2: label 'delta' is not one of --labels ['alpha', 'beta', 'gamma']"
    ]


def test_the_factory_model_imports_as_a_classifier_and_as_an_embedder(
    tmp_path: Path, key: Ed25519PrivateKey, minilm_default: Any
) -> None:
    """The factory's own MiniLM (int8-l3 of the suite's cached build): its encoder + head
    merged into one ONNX file imports as a classifier that scores the factory's held-out split
    exactly as the factory measured it, and its encoder alone imports as an embedder whose
    vectors are the factory bundle's."""
    from onnx import compose

    from slmops.cloud.factory.corpus import load_topics, split_topics

    src = read_bundle(minilm_default.bundles["int8-l3"])
    m0 = src.manifest
    split = split_topics(load_topics(), seed=0)
    assert split.labels == m0.labels
    rows = [
        {"text": t, "label": split.labels[y]}
        for t, y in zip(split.held_out_texts, split.held_out_labels, strict=True)
    ]
    data = _jsonl(tmp_path / "heldout.jsonl", rows)
    encoder = onnx.load(str(src.path / "encoder.onnx"))
    head = onnx.load(str(src.path / "head.onnx"))
    merged = compose.merge_models(encoder, head, io_map=[("embedding", "embedding")], prefix2="head_")
    common = {
        "tokenizer_path": src.path / "tokenizer.json",
        "data_path": data,
        "name": "imported-minilm",
        "version": 1,
        "key": key,
        "max_tokens": m0.preprocessing.max_tokens,
    }
    clf = import_model(
        onnx_path=_write(tmp_path / "model.onnx", merged.SerializeToString()),
        out_dir=tmp_path / "clf",
        labels=list(m0.labels),
        **common,
    ).bundle.manifest
    assert (clf.task, clf.output_kind, clf.labels) == ("classification", "logits", m0.labels)
    assert clf.reference is not None
    assert m0.reference is not None
    assert clf.reference.count == len(rows) == m0.reference.count
    assert clf.reference.accuracy == pytest.approx(m0.reference.accuracy, abs=1e-9)
    trust = TrustStore([key.public_key()])
    texts = split.held_out_texts[:16]
    ours = verify_bundle(read_bundle(tmp_path / "clf"), trust).predict(texts)
    theirs = verify_bundle(src, TrustStore.from_files([minilm_default.pub_path])).predict(texts)
    assert [p.label for p in ours] == [p.label for p in theirs]

    emb_data = _jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in split.held_out_texts[:64]])
    emb = import_model(
        onnx_path=src.path / "encoder.onnx",
        out_dir=tmp_path / "emb",
        task="embedding",
        **{**common, "data_path": emb_data, "name": "imported-minilm-emb"},
    ).bundle.manifest
    assert (emb.task, emb.output, emb.output_kind, emb.labels) == ("embedding", "embedding", "embedding", [])
    assert emb.reference is not None
    assert emb.reference.count == 64
    session = verify_bundle(read_bundle(tmp_path / "emb"), trust)
    assert session.run(texts).values.shape == (16, 384)
    # Against the factory's own embedding of the same texts (its encoder, its tokenizer), one
    # text per run: dynamic int8 takes its activation scale from the whole batch.
    texts = texts[:4]
    vectors = np.concatenate([session.run([t]).values for t in texts])
    from slmops.cloud.factory.minilm import INPUT_NAMES, embed
    from slmops.shared.preprocess import TokenizerFeaturizer

    featurizer = TokenizerFeaturizer(src.path / "tokenizer.json", m0.preprocessing, dict(INPUT_NAMES), {})
    encoder_bytes = (src.path / "encoder.onnx").read_bytes()
    direct = np.concatenate([embed(encoder_bytes, featurizer, [t]) for t in texts])
    cos = np.sum(vectors * direct, axis=1) / np.linalg.norm(direct, axis=1)
    assert cos.min() > 0.99999
