"""The default model: all-MiniLM-L6-v2 as a 12-topic classifier, in three variants.

For each variant the factory writes the encoder graph from the pretrained weights
(``cloud.factory.encoder``), quantizes it when asked (dynamic int8, per-channel, MatMul and
Gather weights, ``onnxruntime.quantization``), embeds the training split with *that* encoder
(so an int8 head is fitted on int8 embeddings: reusing the fp32 head cost ~0.7 pt in the
issue's measurements) and fits the linear head (``cloud.factory.head``). The bundle is
``encoder.onnx`` (role model) + ``head.onnx`` (role head: input ``embedding``, output
``logits``, initializers ``W``/``b``) + ``tokenizer.json`` (role tokenizer).

Every figure in a manifest is measured on the written bundle through ``shared.runtime`` (the
path a node serves with): held-out accuracy and reference profile, top-1 agreement with the
fp32 variant on the held-out texts, size, latency (one text per call, one thread, tokenizer
included) and resident memory of a fresh process (``cloud.factory.rss``), from which
``min_memory_mb`` is derived.

Deterministic: for a fixed seed, weights and corpus, ``encoder.onnx`` and ``head.onnx`` are
the same bytes on every run on the same machine (graph written in a fixed order, quantization
deterministic, embeddings from a one-thread session in fixed batches, a deterministic fit).
Measured figures in the manifest (latency, memory, created) vary.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.corpus import Split, load_topics, split_topics
from slmops.cloud.factory.encoder import INPUT_NAMES, MINILM_L6, build_encoder, build_head
from slmops.cloud.factory.head import fit_head
from slmops.cloud.factory.profile import DEFAULT_EDGES, out_of_scope_spec, reference_profile
from slmops.cloud.factory.quantize import quiet_root_logger
from slmops.cloud.factory.rss import MemoryFigures, measure_rss
from slmops.cloud.factory.smooth import smooth_activations
from slmops.cloud.factory.weights import Weights, load_weights
from slmops.shared.bundle import Bundle, FileData, write_bundle
from slmops.shared.messages import HistogramEdges, ModelManifest, Preprocessing, SmokeTest, TensorSpec
from slmops.shared.names import validate_model_name
from slmops.shared.preprocess import TokenizerFeaturizer
from slmops.shared.runtime import Session, load_session

__all__ = [
    "EDGES",
    "FINETUNED",
    "MAX_TOKENS",
    "VARIANTS",
    "FactoryReport",
    "Variant",
    "VariantReport",
    "build_minilm",
    "quantize_encoder",
]

log = structlog.get_logger(__name__)

F32 = npt.NDArray[np.float32]

#: Truncation length in tokens ([CLS] and [SEP] included); chat utterances are ~5-30 tokens.
MAX_TOKENS = 64
ENCODER_FILE, HEAD_FILE, TOKENIZER_FILE = "encoder.onnx", "head.onnx", "tokenizer.json"
#: Texts per encoder call when embedding the corpus (sorted by length, so little padding).
EMBED_BATCH = 32

#: Input length in tokens; latency in ms (one text: ~1 ms for 3 int8 layers, ~8 for 6 fp32).
EDGES = HistogramEdges(
    confidence=list(DEFAULT_EDGES.confidence),
    input_length=[0, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 48, 64, 1_000_000],
    latency_ms=[0, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 1e6],
)


@dataclass(frozen=True, slots=True)
class Variant:
    """``layers`` of the 6 kept; ``int8`` quantized; ``smoke_tolerance`` on probabilities
    (int8 kernels round differently on CPUs without the instructions used here)."""

    name: str
    layers: int
    int8: bool
    smoke_tolerance: float
    #: Fine-tune the last layer (and a head) on the training split first (``finetune``:
    #: needs the optional CPU torch extra).
    finetune: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp32", 6, int8=False, smoke_tolerance=1e-3),
        Variant("int8", 6, int8=True, smoke_tolerance=5e-2),
        Variant("int8-l3", 3, int8=True, smoke_tolerance=5e-2),
    )
}
#: Variants built only when asked for by name (``--variants``): they need the ``finetune``
#: extra (a CPU torch), which the default build never does.
FINETUNED: dict[str, Variant] = {
    "int8-l3-ft": Variant("int8-l3-ft", 3, int8=True, smoke_tolerance=5e-2, finetune=True)
}

#: Hostile inputs added to the smoke tests when the variant's top-1 margin on them is at
#: least ``HOSTILE_MARGIN`` (a near-tie could flip on another CPU and refuse a good bundle).
HOSTILE_SMOKE = ("", "word " * 2000, "日本語のテキストです", "Привет, как дела?", "😀🔥👍🏽 🚀 emoji!!")
HOSTILE_MARGIN = 0.1
#: min_memory_mb = peak RSS (32 × max_tokens batch) × this, rounded up to 16 MB: room for the
#: node's own state (NATS client, SQLite, buffers) beside the model.
MEMORY_HEADROOM = 1.5


@dataclass(frozen=True, slots=True)
class VariantReport:
    name: str
    layers: int
    bundle: Bundle
    accuracy: float
    agreement: float | None
    size_bytes: int
    latency_ms_p50: float
    memory: MemoryFigures | None
    min_memory_mb: int
    seconds: float


@dataclass(frozen=True, slots=True)
class FactoryReport:
    variants: list[VariantReport]
    seconds: float
    train_size: int
    held_out_size: int
    majority_accuracy: float
    weights_source: str
    extra: dict[str, float] = field(default_factory=dict)


#: Training texts whose activations calibrate the smoothing before quantization (the first
#: ones of the training split: deterministic, never the held-out or reference texts).
CALIBRATION_TEXTS = 256


def calibration_batches(tokenizer: TokenizerFeaturizer, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Feeds of ``texts`` in batches of ``EMBED_BATCH``, sorted by token length (as ``embed``)."""
    rows = tokenizer.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: (rows.lengths[i], i))
    return [
        dict(tokenizer.feeds(rows, order[i : i + EMBED_BATCH])) for i in range(0, len(order), EMBED_BATCH)
    ]


def quantize_encoder(fp32: bytes, calibration: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """Dynamic int8 quantization of an encoder graph: weights of MatMul (with a constant B) and
    Gather (the embedding tables) per channel, activations quantized at run time. With
    ``calibration`` feeds, activation ranges are first smoothed into the weights
    (``cloud.factory.smooth``: all 20 reference sentences then reach cosine >= 0.99)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if calibration:
        fp32 = smooth_activations(fp32, calibration)
    with tempfile.TemporaryDirectory(prefix="slmops-q-") as tmp, quiet_root_logger():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"MatMulConstBOnly": True},
        )
        return dst.read_bytes()


def preprocessing() -> Preprocessing:
    return Preprocessing(
        kind="tokenizer",
        max_tokens=MAX_TOKENS,
        tokenizer=TOKENIZER_FILE,
        input_names=dict(INPUT_NAMES),
        lowercase=False,  # the tokenizer file's own normaliser lower-cases
        word_ngrams=[],
        char_ngrams=[],
    )


def embed(encoder: bytes, tokenizer: TokenizerFeaturizer, texts: Sequence[str]) -> F32:
    """Encoder embeddings float32 [n, dim] of ``texts``: one-thread session, texts sorted by
    token length and run ``EMBED_BATCH`` at a time, each batch padded to its longest."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(encoder, opts, providers=["CPUExecutionProvider"])
    rows = tokenizer.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: (rows.lengths[i], i))
    out = np.zeros((len(texts), MINILM_L6.hidden), dtype=np.float32)
    for start in range(0, len(order), EMBED_BATCH):
        index = order[start : start + EMBED_BATCH]
        (emb,) = session.run(["embedding"], tokenizer.feeds(rows, index))
        out[index] = emb
    return out


def _manifest(
    name: str, version: int, variant: str, labels: list[str], created: datetime | None
) -> ModelManifest:
    tokens = [TensorSpec(name=n, dtype="int64", shape=["N", "T"]) for n in INPUT_NAMES.values()]
    return ModelManifest(
        name=name,
        version=version,
        variant=variant,
        sha256="",
        size_bytes=0,
        inputs=tokens,
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["N", len(labels)])],
        preprocessing=preprocessing(),
        labels=labels,
        edges=EDGES,
        created=created or datetime.now(UTC),
        task="classification",
        output="logits",
        output_kind="logits",
    )


def _unknown_tokens(session: Session, texts: Sequence[str]) -> list[int] | None:
    """Unknown tokens per held-out text (the reference of the unknown-token share); None
    when the bundle's tokenizer has no unknown token."""
    tok = session.tokenizer
    if tok is None or tok.unk_id is None:
        return None
    return tok.encode(texts).unknown


def _latency_p50(session: Session, texts: Sequence[str], n: int = 50) -> float:
    session.predict([texts[0]])
    samples = []
    for text in texts[:n]:
        t0 = time.perf_counter()
        session.predict([text])
        samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples)


def _smoke(
    session: Session, texts: Sequence[str], probs: Sequence[Sequence[float]], tolerance: float
) -> list[SmokeTest]:
    """Per label, the held-out text predicted as it with the highest confidence (``probs``:
    the reference profile's), plus ``HOSTILE_SMOKE`` texts with a clear top-1; expected
    values from one run of exactly these texts, as a node runs its smoke tests."""
    best: dict[int, int] = {}
    for i, p in enumerate(probs):
        k = int(np.argmax(p))
        if k not in best or p[k] > probs[best[k]][k]:
            best[k] = i
    chosen = [texts[best[k]] for k in sorted(best)]
    out = session.run([*chosen, *HOSTILE_SMOKE])
    tests = []
    for j, text in enumerate([*chosen, *HOSTILE_SMOKE]):
        row = out.values[j]
        top2 = np.sort(row)[-2:]
        if j >= len(chosen) and not (out.ok[j] and float(top2[1] - top2[0]) >= HOSTILE_MARGIN):
            continue
        label = session.manifest.labels[int(row.argmax())]
        tests.append(
            SmokeTest(text=text, label=label, probs=[round(float(x), 6) for x in row], tolerance=tolerance)
        )
    return tests


@dataclass(slots=True)
class _Draft:
    """A variant built and measured in-process, written as a draft bundle (for the RSS
    measurement) but not yet with its final manifest."""

    variant: Variant
    files: list[FileData]
    manifest: ModelManifest
    path: Path
    size: int
    accuracy: float
    predictions: list[int]
    latency_ms: float
    seconds: float


def _draft(
    variant: Variant,
    weights: Weights,
    split: Split,
    tokenizer: TokenizerFeaturizer,
    draft_dir: Path,
    key: Ed25519PrivateKey,
    *,
    name: str,
    version: int,
    created: datetime | None,
) -> _Draft:
    t0 = time.perf_counter()
    tensors = weights.tensors
    if variant.finetune:
        from slmops.cloud.factory.finetune import finetune_student

        frozen = build_encoder(tensors, layers=variant.layers)
        start = fit_head(embed(frozen, tokenizer, split.train_texts), split.train_labels, len(split.labels))
        tuned = finetune_student(
            tensors, tokenizer, split.train_texts, split.train_labels, start, layers=variant.layers
        )
        log.info(
            "student_finetuned", variant=variant.name, losses=tuned.losses, seconds=round(tuned.seconds, 1)
        )
        tensors = tuned.tensors
    encoder = build_encoder(tensors, layers=variant.layers, name=f"{name}-{variant.name}-encoder")
    if variant.int8:
        encoder = quantize_encoder(
            encoder, calibration_batches(tokenizer, split.train_texts[:CALIBRATION_TEXTS])
        )
    w, b = fit_head(embed(encoder, tokenizer, split.train_texts), split.train_labels, len(split.labels))
    files = [
        FileData(ENCODER_FILE, encoder, "model"),
        FileData(HEAD_FILE, build_head(w, b, name=f"{name}-{variant.name}-head"), "head"),
        FileData(TOKENIZER_FILE, weights.tokenizer_json, "tokenizer"),
    ]
    manifest = _manifest(name, version, variant.name, split.labels, created)
    draft = write_bundle(draft_dir / variant.name, files, manifest, key)
    session = load_session(draft)
    profile = reference_profile(
        session, split.held_out_texts, split.held_out_labels, EDGES, latency_samples=100
    )
    assert profile.held_out is not None  # reference_profile always fills it
    smoke = _smoke(session, split.held_out_texts, profile.held_out.probs, variant.smoke_tolerance)
    return _Draft(
        variant=variant,
        files=files,
        manifest=msgspec.structs.replace(
            manifest,
            reference=profile,
            smoke_tests=smoke,
            out_of_scope=out_of_scope_spec(
                profile,
                split.train_texts,
                split.held_out_texts,
                unknown=_unknown_tokens(session, split.held_out_texts),
            ),
        ),
        path=draft.path,
        size=sum(len(f.data) for f in files if isinstance(f.data, bytes)),
        accuracy=profile.accuracy if profile.accuracy is not None else 0.0,
        predictions=[int(np.argmax(p)) for p in profile.held_out.probs],
        latency_ms=_latency_p50(session, split.held_out_texts),
        seconds=time.perf_counter() - t0,
    )


def _finish(
    d: _Draft,
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    split: Split,
    seed: int,
    fp32_predictions: list[int] | None,
    memory: MemoryFigures | None,
) -> VariantReport:
    v = d.variant
    agreement = (
        float(np.mean(np.asarray(d.predictions) == np.asarray(fp32_predictions)))
        if fp32_predictions is not None
        else None
    )
    min_memory = int(math.ceil(memory.peak_mb * MEMORY_HEADROOM / 16.0) * 16) if memory is not None else 0
    mem_note = f", RSS load {memory.load_mb:.0f} MB / peak {memory.peak_mb:.0f} MB" if memory else ""
    agree_note = f"{agreement:.4f}" if agreement is not None else "n/a"
    notes = (
        f"all-MiniLM-L6-v2, {v.layers} of {MINILM_L6.layers} layers"
        f"{', the last fine-tuned on the training split (torch)' if v.finetune else ''}"
        f"{', int8 dynamic per-channel' if v.int8 else ', fp32'}, linear head fitted on its embeddings; "
        f"chatterbot-corpus english, {len(split.labels)} topics, seed={seed}, "
        f"train={len(split.train_texts)}, held_out={len(split.held_out_texts)}; "
        f"held-out accuracy {d.accuracy:.4f}, fp32 agreement {agree_note}, size {d.size} B, "
        f"latency p50 {d.latency_ms:.2f} ms (batch 1, 1 thread){mem_note}"
    )
    final = msgspec.structs.replace(d.manifest, min_memory_mb=min_memory, notes=notes)
    bundle = write_bundle(out_dir / v.name, d.files, final, key)
    log.info(
        "variant_built",
        variant=v.name,
        accuracy=round(d.accuracy, 4),
        agreement=agreement,
        size_bytes=d.size,
        latency_ms=round(d.latency_ms, 2),
        min_memory_mb=min_memory,
        seconds=round(d.seconds, 1),
    )
    return VariantReport(
        name=v.name,
        layers=v.layers,
        bundle=bundle,
        accuracy=d.accuracy,
        agreement=agreement,
        size_bytes=d.size,
        latency_ms_p50=d.latency_ms,
        memory=memory,
        min_memory_mb=min_memory,
        seconds=d.seconds,
    )


def build_minilm(
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    name: str = "topics",
    version: int = 1,
    seed: int = 0,
    variants: Sequence[str] = tuple(VARIANTS),
    weights_dir: Path | None = None,
    weights: Weights | None = None,
    corpus_dir: Path | None = None,
    created: datetime | None = None,
    measure_memory: bool = True,
) -> FactoryReport:
    """Build the signed bundles ``out_dir/<variant>/`` of the MiniLM topic classifier.

    ``out_dir`` must be empty or absent. Weights come from ``weights`` or ``load_weights(
    weights_dir)`` (raises ``WeightsError``); the corpus split from ``seed``. ``measure_memory``
    False skips the RSS subprocesses (``min_memory_mb`` 0). Raises ``ValueError`` for an
    unknown variant, a bad version or a non-empty ``out_dir``."""
    t0 = time.perf_counter()
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")
    validate_model_name(name)
    known = {**VARIANTS, **FINETUNED}
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown or 'none given'}; known: {sorted(known)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output directory {str(out_dir)!r} is not empty")
    weights = weights or load_weights(weights_dir)
    split = split_topics(load_topics(corpus_dir), seed=seed)
    ordered = sorted(set(variants), key=list(known).index)  # fp32 first: the others agree with it
    with tempfile.TemporaryDirectory(prefix="slmops-minilm-") as tmp:
        tok_path = Path(tmp) / TOKENIZER_FILE
        tok_path.write_bytes(weights.tokenizer_json)
        tokenizer = TokenizerFeaturizer(tok_path, preprocessing(), dict(INPUT_NAMES), {})
        drafts = [
            _draft(
                known[v],
                weights,
                split,
                tokenizer,
                Path(tmp),
                key,
                name=name,
                version=version,
                created=created,
            )
            for v in ordered
        ]
        memory = measure_rss([d.path for d in drafts]) if measure_memory else [None] * len(drafts)
        fp32 = next((d.predictions for d in drafts if d.variant.name == "fp32"), None)
        reports = [
            _finish(d, out_dir, key, split=split, seed=seed, fp32_predictions=fp32, memory=m)
            for d, m in zip(drafts, memory, strict=True)
        ]
    return FactoryReport(
        variants=reports,
        seconds=time.perf_counter() - t0,
        train_size=len(split.train_texts),
        held_out_size=len(split.held_out_texts),
        majority_accuracy=split.majority_accuracy,
        weights_source=weights.source,
    )
