"""Tiny transformer-shaped bundles for tests, built here with ``onnx.helper`` and the
``tokenizers`` library (no downloads): a WordPiece ``tokenizer.json``, a one-layer BERT-like
encoder (token + position + type embeddings, LayerNorm, masked self-attention with a
residual, masked mean pooling, L2 norm → ``embedding`` [batch, dim]) and a linear head
(``embedding`` → ``logits``, initializers ``W`` and ``b``).

Each label's word is a token whose embedding points along that label's axis, so a text
containing it is classified as that label through a real ORT session; ``nan_word`` gets a NaN
embedding (a model that gives NaN for some inputs, fault 7).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from _models import EDGES
from slmops.shared.bundle import Bundle, FileData, write_bundle
from slmops.shared.messages import ModelManifest, OutOfScopeSpec, Preprocessing, SmokeTest, TensorSpec

LABELS = ["alpha", "beta", "gamma"]
WORDS = ["some", "words", "about", "the", "a", "text", "hello", "world", "nanword", "long", "##s"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
DIM = 16
MAX_POS = 512
OPSET = 17


def vocab(labels: list[str]) -> dict[str, int]:
    return {w: i for i, w in enumerate([*SPECIALS, *labels, *WORDS])}


def tokenizer_json(labels: list[str] = LABELS, *, pad_to: int | None = 128) -> bytes:
    """A BERT-style WordPiece tokenizer; like the real MiniLM file it pads to ``pad_to``
    unless the runtime switches that off."""
    v = vocab(labels)
    tok = Tokenizer(models.WordPiece(v, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", v["[CLS]"]), ("[SEP]", v["[SEP]"])],
    )
    if pad_to is not None:
        tok.enable_padding(pad_id=v["[PAD]"], pad_token="[PAD]", length=pad_to)
    return tok.to_str().encode()


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def encoder_onnx(
    labels: list[str] = LABELS,
    *,
    seed: int = 7,
    nan_word: str | None = None,
    token_types: bool = True,
    input_names: tuple[str, str, str] = ("input_ids", "attention_mask", "token_type_ids"),
    ids_dtype: int = TensorProto.INT64,
) -> bytes:
    """The encoder graph (see the module docstring)."""
    rng = np.random.default_rng(seed)
    v = vocab(labels)
    d = DIM
    emb = np.zeros((len(v), d), dtype=np.float32)
    emb[:, d - 1] = 1.0
    emb += rng.normal(0, 0.01, emb.shape).astype(np.float32)
    for c, label in enumerate(labels):
        emb[v[label], c] += 6.0
    if nan_word is not None:
        emb[v[nan_word]] = np.nan
    pos = rng.normal(0, 0.01, (MAX_POS, d)).astype(np.float32)
    typ = rng.normal(0, 0.01, (2, d)).astype(np.float32)
    w = {n: rng.normal(0, 0.02, (d, d)).astype(np.float32) for n in ("Wq", "Wk", "Wv", "Wo")}
    ids_name, mask_name, types_name = input_names
    inits = [
        _init("E", emb),
        _init("P", pos),
        _init("TT", typ),
        _init("gamma", np.ones(d, np.float32)),
        _init("beta", np.zeros(d, np.float32)),
        _init("zero", np.array(0, np.int64)),
        _init("one", np.array(1, np.int64)),
        _init("axis1", np.array([1], np.int64)),
        _init("neg", np.array(-1e4, np.float32)),
        _init("fone", np.array(1.0, np.float32)),
        _init("eps", np.array(1e-9, np.float32)),
        _init("scale", np.array(1.0 / np.sqrt(d), np.float32)),
        *(_init(n, a) for n, a in w.items()),
    ]
    nodes = [
        helper.make_node("Cast", [ids_name], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Cast", [mask_name], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["E", "ids64"], ["tok"]),
        helper.make_node("Shape", ["ids64"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["T"]),
        helper.make_node("Range", ["zero", "T", "one"], ["positions"]),
        helper.make_node("Gather", ["P", "positions"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["x0"]),
    ]
    inputs = [
        helper.make_tensor_value_info(ids_name, ids_dtype, ["batch", "seq"]),
        helper.make_tensor_value_info(mask_name, ids_dtype, ["batch", "seq"]),
    ]
    if token_types:
        inputs.append(helper.make_tensor_value_info(types_name, ids_dtype, ["batch", "seq"]))
        nodes += [
            helper.make_node("Cast", [types_name], ["types64"], to=TensorProto.INT64),
            helper.make_node("Gather", ["TT", "types64"], ["typ"]),
            helper.make_node("Add", ["x0", "typ"], ["x1"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["x0"], ["x1"]))
    nodes += [
        helper.make_node("LayerNormalization", ["x1", "gamma", "beta"], ["x"], axis=-1, epsilon=1e-12),
        helper.make_node("MatMul", ["x", "Wq"], ["q"]),
        helper.make_node("MatMul", ["x", "Wk"], ["k"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Sub", ["fone", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["bias0"]),
        helper.make_node("Unsqueeze", ["bias0", "axis1"], ["bias"]),
        helper.make_node("Add", ["s1", "bias"], ["s"]),
        helper.make_node("Softmax", ["s"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "Wo"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["h"]),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count0"], keepdims=1),
        helper.make_node("Max", ["count0", "eps"], ["count"]),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("ReduceL2", ["pooled"], ["norm0"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm0", "eps"], ["norm"]),
        helper.make_node("Div", ["pooled", "norm"], ["embedding"]),
    ]
    inits.append(_init("axis2", np.array([2], np.int64)))
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        inputs,
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", d])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="slmops-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def head_onnx(n_labels: int, *, bias: list[float] | None = None, scale: float = 10.0) -> bytes:
    """``logits = embedding @ W + b``; W reads the first ``n_labels`` axes."""
    w = np.zeros((DIM, n_labels), np.float32)
    for c in range(n_labels):
        w[c, c] = scale
    b = np.asarray(bias if bias is not None else [0.0] * n_labels, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["embedding", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
        ],
        "tiny_head",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels])],
        [_init("W", w), _init("b", b)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="slmops-tests"
    )
    model.ir_version = 8
    return model.SerializeToString()


def single_classifier_onnx(labels: list[str] = LABELS, **kw: object) -> bytes:
    """Encoder and head merged into one graph giving ``logits`` (a bring-your-own model)."""
    enc = onnx.load_from_string(encoder_onnx(labels, **kw))  # type: ignore[arg-type]
    head = onnx.load_from_string(head_onnx(len(labels)))
    enc.graph.initializer.extend(head.graph.initializer)
    enc.graph.node.extend(head.graph.node)
    del enc.graph.output[:]
    enc.graph.output.extend(head.graph.output)
    onnx.checker.check_model(enc)
    return enc.SerializeToString()


PP = Preprocessing(
    kind="tokenizer",
    max_tokens=32,
    tokenizer="tokenizer.json",
    input_names={
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "token_type_ids": "token_type_ids",
    },
)
SMOKE_TEXTS = ["some words about alpha", "the beta text", "a gamma", "hello world"]


def _inputs() -> list[TensorSpec]:
    return [TensorSpec(name=n, dtype="int64", shape=["N", "T"]) for n in PP.input_names.values()]


def make_transformer_bundle(
    out: Path,
    key: Ed25519PrivateKey,
    *,
    version: int = 1,
    name: str = "tfclf",
    labels: list[str] | None = None,
    task: str = "classification",
    single_file: bool = False,
    bias: list[float] | None = None,
    nan_word: str | None = None,
    smoke_texts: list[str] | None = None,
    extra_data: int = 0,
    notes: str = "",
    out_of_scope: OutOfScopeSpec | None = None,
    min_memory_mb: int = 0,
) -> Bundle:
    """A signed tokenizer bundle: ``encoder.onnx`` + ``head.onnx`` + ``tokenizer.json``
    (classification), or one ``model.onnx`` (``single_file`` classifier or ``task`` embedding).
    Smoke tests are the model's own answers on ``smoke_texts``. ``extra_data`` bytes of
    seeded random data ship as a "data" file ``weights.bin`` (a big bundle); ``notes`` makes
    the manifest as large as wanted."""
    from slmops.shared.runtime import load_session

    labels = list(labels or LABELS)
    tok = tokenizer_json(labels)
    if task == "embedding":
        files = [FileData("model.onnx", encoder_onnx(labels, nan_word=nan_word), "model")]
        outputs = [TensorSpec(name="embedding", dtype="float32", shape=["N", DIM])]
        output, kind, man_labels = "embedding", "embedding", []
    elif single_file:
        files = [FileData("model.onnx", single_classifier_onnx(labels, nan_word=nan_word), "model")]
        outputs = [TensorSpec(name="logits", dtype="float32", shape=["N", len(labels)])]
        output, kind, man_labels = "logits", "logits", labels
    else:
        files = [
            FileData("encoder.onnx", encoder_onnx(labels, nan_word=nan_word), "model"),
            FileData("head.onnx", head_onnx(len(labels), bias=bias), "head"),
        ]
        outputs = [TensorSpec(name="logits", dtype="float32", shape=["N", len(labels)])]
        output, kind, man_labels = "logits", "logits", labels
    files.append(FileData("tokenizer.json", tok, "tokenizer"))
    if extra_data:
        data = np.random.default_rng(0).integers(0, 256, extra_data, dtype=np.uint8).tobytes()
        files.append(FileData("weights.bin", data, "data"))
    manifest = ModelManifest(
        name=name,
        version=version,
        sha256="",
        size_bytes=0,
        inputs=_inputs(),
        outputs=outputs,
        preprocessing=PP,
        labels=man_labels,
        edges=EDGES,
        created=datetime.now(UTC),
        task=task,
        output=output,
        output_kind=kind,
        notes=notes,
        min_memory_mb=min_memory_mb,
    )
    unsigned = write_bundle(out, files, manifest, key)
    session = load_session(unsigned)
    texts = smoke_texts or SMOKE_TEXTS
    run = session.run(texts)
    smoke = [
        SmokeTest(
            text=t,
            label=man_labels[int(v.argmax())] if man_labels else "",
            probs=[float(x) for x in v],
            tolerance=1e-4,
        )
        for t, v in zip(texts, run.values, strict=True)
    ]
    changes: dict[str, object] = {"smoke_tests": smoke}
    if out_of_scope is not None:
        changes["out_of_scope"] = out_of_scope
    if task == "embedding":
        from slmops.cloud.factory.embedding import embedding_stats

        probe = session.run([*texts, *LABELS, "hello world", "the text", "a long text " * 5])
        assert probe.norms is not None
        changes["embedding"] = embedding_stats(probe.values, probe.norms, bins=6)
    return write_bundle(out, files, msgspec_replace(unsigned.manifest, **changes), key)


def msgspec_replace(m: ModelManifest, **changes: object) -> ModelManifest:
    import msgspec

    return msgspec.structs.replace(m, **changes)
