"""Compression passes for ``slmops models optimize``: each a small function from one model state
to the next, so a candidate is a chain of them (``cloud.factory.optimize``).

The state starts from the teacher bundle's fp32 ``encoder.onnx`` (``tensors_of``: the HF-named
tensors in torch layout, read back from the graph ``cloud.factory.encoder`` wrote) and its
``tokenizer.json``. Graph-level passes (``dynamic_int8``, ``static_int8``) run after the
encoder is written (``encoder_of``); ``refit_head`` fits the linear head on the *final*
encoder's embeddings (an int8 or shallower encoder moves them). ``ngram_student`` leaves the
transformer altogether: the hashed n-gram classifier of ``cloud.factory.build`` trained on the
teacher's labels.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from slmops.cloud.factory.build import TrainConfig, TrainedModel, train
from slmops.cloud.factory.corpus import Split
from slmops.cloud.factory.encoder import INPUT_NAMES, build_encoder
from slmops.cloud.factory.head import fit_head
from slmops.cloud.factory.minilm import embed, preprocessing, quantize_encoder
from slmops.cloud.factory.quantize import quiet_root_logger
from slmops.shared.preprocess import TokenizerFeaturizer

__all__ = [
    "EncoderState",
    "dynamic_int8",
    "encoder_of",
    "featurizer",
    "keep_layers",
    "ngram_student",
    "prune_vocabulary",
    "refit_head",
    "static_int8",
    "tensors_of",
]

F32 = npt.NDArray[np.float32]
WORD = "embeddings.word_embeddings.weight"
#: Calibration texts per static-quantization run: 128 of the training texts (the activation
#: ranges settle within ~100 short utterances; more only costs time).
CALIBRATION_TEXTS = 128


@dataclass(frozen=True, slots=True)
class EncoderState:
    """A transformer candidate between passes: HF-named ``tensors`` (torch layout), the number
    of ``layers`` kept, the ``tokenizer`` JSON bytes and, once written, the ``encoder`` graph."""

    tensors: dict[str, npt.NDArray[np.generic]]
    layers: int
    tokenizer: bytes
    encoder: bytes = b""
    vocab_size: int = 0


def tensors_of(encoder: bytes) -> tuple[dict[str, npt.NDArray[np.generic]], int]:
    """The HF-named tensors (torch layout: linear weights [out, in]) and layer count of an fp32
    encoder written by ``cloud.factory.encoder.build_encoder``. Raises ``ValueError`` for a
    graph without float embeddings (e.g. an already quantized encoder)."""
    model = onnx.load_from_string(encoder)
    tensors: dict[str, npt.NDArray[np.generic]] = {}
    for init in model.graph.initializer:
        name = init.name
        if not name.startswith(("embeddings.", "encoder.layer.")):
            continue
        array = numpy_helper.to_array(init)
        linear = name.endswith(".weight") and array.ndim == 2 and name.startswith("encoder.layer.")
        tensors[name] = np.ascontiguousarray(array.T) if linear else array
    word = tensors.get(WORD)
    if word is None or word.dtype != np.float32:
        raise ValueError(
            "optimize needs the fp32 encoder slmops builds (encoder.onnx with a float32 "
            f"{WORD!r}); give it the fp32 variant's bundle"
        )
    layers = 1 + max((int(n.split(".")[2]) for n in tensors if n.startswith("encoder.layer.")), default=-1)
    return tensors, layers


def keep_layers(state: EncoderState, k: int) -> EncoderState:
    """Keep the first ``k`` transformer layers (the embeddings and pooling stay). Raises
    ``ValueError`` unless ``1 <= k <= state.layers``."""
    if not 1 <= k <= state.layers:
        raise ValueError(f"layers to keep must be in 1..{state.layers}, got {k!r}")
    kept = {
        n: t
        for n, t in state.tensors.items()
        if not n.startswith("encoder.layer.") or int(n.split(".")[2]) < k
    }
    return replace(state, tensors=kept, layers=k, encoder=b"")


def _fallback(token: str) -> bool:
    """Every single-character piece and ``##`` piece: with them any word of known characters
    still tokenizes (WordPiece falls back to characters), only rarer words split finer."""
    return len(token) == 1 or (token.startswith("##") and len(token) == 3)


def prune_vocabulary(state: EncoderState, texts: Sequence[str], *, keep_first: int = 0) -> EncoderState:
    """Keep the WordPiece tokens that ``texts`` (training/calibration text: never the held-out
    set a candidate is judged on) tokenize to, the special tokens and the character fallback;
    renumber them in their old order and rewrite ``tokenizer.json`` (vocabulary, special-token
    ids, padding id) and the embedding table's rows together. A character the full vocabulary
    lacks still becomes ``[UNK]``, so the unknown-token count is the full vocabulary's.
    ``keep_first`` also keeps the pieces with ids below it (the common words of the language,
    whatever the training text holds). Raises ``ValueError`` for a negative ``keep_first``."""
    if keep_first < 0:
        raise ValueError(f"keep_first must be >= 0, got {keep_first!r}")
    doc = json.loads(state.tokenizer)
    model = doc.get("model", {})
    if model.get("type") != "WordPiece":
        raise ValueError(f"vocabulary pruning needs a WordPiece tokenizer, got {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(state.tokenizer.decode())
    tok.no_padding()
    tok.no_truncation()  # every token of a long text, not only those a node's truncation keeps
    seen = {i for e in tok.encode_batch(list(texts)) for i in e.ids}
    special = {int(t["id"]) for t in doc.get("added_tokens", [])}
    keep = sorted(
        i for tok, i in vocab.items() if i in seen or i in special or i < keep_first or _fallback(tok)
    )
    new_id = {old: new for new, old in enumerate(keep)}
    by_id = {i: tok for tok, i in vocab.items()}
    model["vocab"] = {by_id[old]: new for old, new in new_id.items()}
    for t in doc.get("added_tokens", []):
        t["id"] = new_id[int(t["id"])]
    for spec in (doc.get("post_processor") or {}).get("special_tokens", {}).values():
        spec["ids"] = [new_id[int(i)] for i in spec["ids"]]
    if isinstance(doc.get("padding"), dict):
        doc["padding"]["pad_id"] = new_id[int(doc["padding"]["pad_id"])]
    tensors = dict(state.tensors)
    tensors[WORD] = np.ascontiguousarray(np.asarray(state.tensors[WORD])[keep])
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    return replace(state, tensors=tensors, tokenizer=data, encoder=b"", vocab_size=len(keep))


def encoder_of(state: EncoderState, *, name: str = "slmops-encoder") -> EncoderState:
    """Write the fp32 encoder graph of ``state`` (``build_encoder`` with its layers)."""
    from slmops.cloud.factory.encoder import BertConfig

    config = BertConfig(layers=state.layers)
    return replace(state, encoder=build_encoder(state.tensors, config=config, layers=state.layers, name=name))


def dynamic_int8(state: EncoderState) -> EncoderState:
    """Dynamic int8, per channel, MatMul and Gather weights (``minilm.quantize_encoder``)."""
    return replace(state, encoder=quantize_encoder(_written(state)))


def static_int8(state: EncoderState, calibration: Sequence[str]) -> EncoderState:
    """Static int8 in QDQ form (``onnxruntime.quantization.quantize_static``): weights per
    channel, activation ranges (MinMax) from ``calibration`` texts (training text, at most
    ``CALIBRATION_TEXTS``), each fed as a batch of one, as nodes serve."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    texts = list(calibration)[:CALIBRATION_TEXTS]
    if not texts:
        raise ValueError("static int8 needs calibration texts")
    with tempfile.TemporaryDirectory(prefix="slmops-qs-") as tmp, quiet_root_logger():
        tok = Path(tmp) / "tokenizer.json"
        tok.write_bytes(state.tokenizer)
        feat = featurizer(tok)
        rows = feat.encode(texts)
        feeds = iter([feat.feeds(rows, [i]) for i in range(len(texts))])

        class _Reader(CalibrationDataReader):  # type: ignore[misc]  # ORT's class is untyped
            def get_next(self) -> dict[str, npt.NDArray[np.generic]] | None:
                return next(feeds, None)

        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(_written(state))
        quantize_static(
            str(src),
            str(dst),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"MatMulConstBOnly": True},
        )
        return replace(state, encoder=dst.read_bytes())


def refit_head(state: EncoderState, split: Split) -> tuple[F32, F32]:
    """``W`` [dim, labels] and ``b`` [labels] fitted (``head.fit_head``) on the final
    encoder's embeddings of the training split."""
    with tempfile.TemporaryDirectory(prefix="slmops-head-") as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tok.write_bytes(state.tokenizer)
        x = embed(_written(state), featurizer(tok), split.train_texts)
    return fit_head(x, split.train_labels, len(split.labels))


def ngram_student(split: Split, teacher_labels: Sequence[int], *, seed: int) -> TrainedModel:
    """The hashed n-gram classifier (``build.train``, numpy) trained on the training texts with
    the teacher's top-1 labels instead of the corpus's (distillation on hard labels)."""
    if len(teacher_labels) != len(split.train_texts):
        raise ValueError(f"need one teacher label per training text, got {len(teacher_labels)}")
    taught = replace(split, train_labels=[int(y) for y in teacher_labels])
    return train(taught, TrainConfig(), seed=seed)


def featurizer(tokenizer: Path) -> TokenizerFeaturizer:
    """The node's tokenizer preprocessing for a ``tokenizer.json`` file."""
    return TokenizerFeaturizer(tokenizer, preprocessing(), dict(INPUT_NAMES), {})


def _written(state: EncoderState) -> bytes:
    if not state.encoder:
        raise ValueError("write the encoder (encoder_of) before a graph pass")
    return state.encoder
