"""Generation bundles: an ONNX Runtime GenAI folder (decoder ONNX + external data,
``genai_config.json``, tokenizer files) made into a signed slmops bundle of task "generation",
with greedy smoke tests and a drift reference measured on held-out prompts.

``make_generation_bundle`` is what ``slmops models import --genai DIR`` and the SmolLM2 factory
call. The folder's files keep their names; roles come from the names (``genai_config.json`` →
"genai_config", ``tokenizer*``/``vocab*``/``merges*``/``special_tokens_map.json``/
``added_tokens.json`` → "tokenizer", ``*.onnx`` named in the config → "model", anything else the
decoder references → "data"). Each held-out prompt is generated greedily, as a node would, so
the reference holds what a node reports: prompt tokens, output tokens, stop reasons, empty
answers, refusal categories, the prompt likelihood (every held-out prompt, not a sample), and
time to first token and tokens/s on the machine that built the bundle (advisory: another
device's speed differs).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.errors import FactoryInputError
from slmops.shared.bundle import Bundle, FileData, TrustStore, read_bundle, write_bundle
from slmops.shared.generation import GenerationParams, GenerationSession, PromptTooLong, refusal_category
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    STOP_REASONS,
    GenerationEdges,
    GenerationHistograms,
    GenerationQualityCase,
    GenerationSmoke,
    GenerationSpec,
    HistogramEdges,
    ModelManifest,
    Preprocessing,
    ReferenceProfile,
    Requirements,
    TensorSpec,
)
from slmops.shared.names import validate_model_name
from slmops.shared.runtime import verify_bundle

__all__ = [
    "GENERATION_EDGES",
    "GENERATION_LABELS",
    "GenerationImportRefused",
    "GenerationReport",
    "make_generation_bundle",
    "read_prompts",
]

#: A generation model's labels: the stop reasons its aggregates count in ``class_counts``
#: ("error" is counted in ``errors``).
GENERATION_LABELS = [r for r in STOP_REASONS if r != "error"]
#: Prompt tokens, time to first token (ms); the likelihood edges come from held-out quantiles.
_PROMPT_EDGES: list[float] = [0, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 1_000_000]
_TTFT_EDGES: list[float] = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 1_000_000]
GENERATION_EDGES = GenerationEdges(
    output_tokens=[0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1_000_000],
    tokens_per_s=[0, 1, 2, 5, 10, 20, 30, 40, 60, 80, 100, 150, 200, 300, 500, 1000, 2000, 5000, 1e9],
)
_TOKENIZER_NAMES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens")


class GenerationImportRefused(FactoryInputError):
    """The folder or the prompts cannot make a generation bundle (the message names the file
    or the prompt line)."""

    what = "generation import"


@dataclass(frozen=True)
class GenerationReport:
    bundle: Bundle
    prompts: int
    smoke: list[GenerationSmoke]
    seconds: float


def read_prompts(path: Path) -> list[str]:
    """Held-out prompts: JSON lines ``{"prompt": "..."}`` (or ``{"text": ...}``). Raises
    ``GenerationImportRefused`` naming the line."""
    out: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerationImportRefused(str(path), f"cannot read: {exc}") from exc
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise GenerationImportRefused(f"{path}:{i}", f"not JSON: {exc}") from exc
        prompt = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationImportRefused(f"{path}:{i}", 'needs a non-empty "prompt" string')
        out.append(prompt)
    if not out:
        raise GenerationImportRefused(str(path), "holds no prompts")
    return out


def _role(name: str, model_file: str) -> str:
    if name == "genai_config.json":
        return "genai_config"
    if name == model_file:
        return "model"
    if name.startswith(_TOKENIZER_NAMES):
        return "tokenizer"
    return "data"


def _files(folder: Path) -> tuple[list[FileData], str]:
    config_path = folder / "genai_config.json"
    try:
        config = json.loads(config_path.read_text())
        model_file = str(config["model"]["decoder"]["filename"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GenerationImportRefused(
            str(config_path), f"not an ONNX Runtime GenAI config with model.decoder.filename: {exc}"
        ) from exc
    if not (folder / model_file).is_file():
        raise GenerationImportRefused(str(folder / model_file), "the decoder the config names is missing")
    files = [
        FileData(path=p.name, data=p, role=_role(p.name, model_file))
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"
    ]
    if not any(f.role == "tokenizer" for f in files):
        raise GenerationImportRefused(str(folder), "no tokenizer file (tokenizer.json) in the folder")
    return files, model_file


def _quantile_edges(values: Sequence[float], bins: int = 10) -> list[float]:
    """Edges over (0, 1]: held-out quantiles inside, 0 and 1 outside (strictly increasing)."""
    if not values:
        return [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0 + 1e-9]
    qs = np.quantile(np.asarray(values), np.linspace(0, 1, bins + 1)[1:-1])
    inner = sorted({round(float(q), 6) for q in qs if 0.0 < q < 1.0})
    return [0.0, *inner, 1.0 + 1e-9]


@dataclass
class _Measured:
    prompt_tokens: list[int]
    output_tokens: list[int]
    likelihood: list[float]
    ttft_ms: list[float]
    tokens_per_s: list[float]
    reasons: list[str]
    empty: int
    refusals: dict[str, int]


def _measure(session: GenerationSession, prompts: Sequence[str], spec: GenerationSpec) -> _Measured:
    m = _Measured([], [], [], [], [], [], 0, dict.fromkeys(spec.refusals, 0))
    params = GenerationParams(max_new_tokens=spec.max_new_tokens, stop=tuple(spec.stop))
    for i, prompt in enumerate(prompts, 1):
        try:
            ids = session.encode(prompt)
        except PromptTooLong as exc:
            raise GenerationImportRefused(f"prompt {i}", str(exc)) from None
        t0 = time.perf_counter()
        run = session.start(ids, params)
        ll = run.prefill(loglik=True)
        first: float | None = None
        while run.step() is not None:
            first = first or time.perf_counter()
        end = time.perf_counter()
        first = first or end
        n = len(run.tokens)
        m.prompt_tokens.append(len(ids))
        m.output_tokens.append(n)
        if ll is not None:
            m.likelihood.append(math.exp(ll))
        m.ttft_ms.append((first - t0) * 1000)
        m.tokens_per_s.append((n - 1) / (end - first) if n > 1 and end > first else 0.0)
        m.reasons.append(run.reason)
        m.empty += not run.text.strip()
        cat = refusal_category(run.text, spec.refusals)
        if cat is not None:
            m.refusals[cat] += 1
    return m


def make_generation_bundle(
    folder: Path,
    *,
    prompts: Sequence[str],
    name: str,
    version: int,
    key: Ed25519PrivateKey,
    out_dir: Path,
    variant: str = "fp32",
    smoke_prompts: Sequence[str] = (),
    smoke_k: int = 8,
    max_new_tokens: int = 128,
    max_prompt_tokens: int = 512,
    stop: Sequence[str] = (),
    refusals: dict[str, list[str]] | None = None,
    loglik_share: float = 0.25,
    min_memory_mb: int = 0,
    parent_version: int | None = None,
    notes: str = "",
    quality: Sequence[GenerationQualityCase] = (),
) -> GenerationReport:
    """Check, measure, sign and write the bundle into ``out_dir`` (must be empty or absent).
    Smoke tests: the first ``smoke_k`` greedy tokens of each of ``smoke_prompts`` (default:
    the first three held-out prompts). Raises ``GenerationImportRefused`` (bad folder,
    prompts, a prompt over ``max_prompt_tokens``, a quality case whose ``match`` is not "exact"
    or "contains" or whose ``expect`` is empty) or ``BundleError`` (GenAI cannot load it).
    ``quality``: the optional quality set (``GenerationSpec.quality``), stored as given."""
    t0 = time.perf_counter()
    validate_model_name(name)
    for i, case in enumerate(quality):
        if case.match not in ("exact", "contains") or not case.expect.strip() or case.max_new_tokens < 1:
            raise GenerationImportRefused(
                f"quality[{i}]",
                f"match must be 'exact' or 'contains', expect non-empty, max_new_tokens >= 1 "
                f"(got {case.match!r}, {case.expect[:32]!r}, {case.max_new_tokens})",
            )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GenerationImportRefused(str(out_dir), "the output directory is not empty")
    files, model_file = _files(folder)
    spec = GenerationSpec(
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        stop=list(stop),
        refusals=dict(refusals or {}),
        loglik_share=loglik_share,
        edges=GENERATION_EDGES,
    )
    session = GenerationSession(
        folder, _manifest(name, version, variant, spec, files, model_file), intra_op_threads=1
    )
    measured = _measure(session, prompts, spec)
    smoke = [
        GenerationSmoke(prompt=p, k=smoke_k, token_ids=session.greedy(p, smoke_k))
        for p in (list(smoke_prompts) or list(prompts[:3]))
    ]
    edges = HistogramEdges(
        confidence=_quantile_edges(measured.likelihood), input_length=_PROMPT_EDGES, latency_ms=_TTFT_EDGES
    )
    reasons = {r: measured.reasons.count(r) for r in STOP_REASONS}
    reference = ReferenceProfile(
        count=len(prompts),
        class_counts={r: reasons[r] for r in GENERATION_LABELS},
        confidence=Histogram.of(edges.confidence, measured.likelihood),
        input_length=Histogram.of(edges.input_length, measured.prompt_tokens),
        latency_ms=Histogram.of(edges.latency_ms, measured.ttft_ms),
        source="held-out prompts",
    )
    spec = msgspec.structs.replace(
        spec,
        smoke=smoke,
        reference=GenerationHistograms(
            output_tokens=Histogram.of(GENERATION_EDGES.output_tokens, measured.output_tokens),
            tokens_per_s=Histogram.of(GENERATION_EDGES.tokens_per_s, measured.tokens_per_s),
            stop_reasons=reasons,
            empty=measured.empty,
            refusals=measured.refusals,
            loglik_sampled=len(measured.likelihood),
        ),
        reference_prompts=len(prompts),
        quality=list(quality),
    )
    extra = {"min_memory_mb": min_memory_mb, "parent_version": parent_version, "notes": notes}
    manifest = _manifest(name, version, variant, spec, files, model_file)
    manifest = msgspec.structs.replace(manifest, edges=edges, reference=reference, **extra)
    bundle = write_bundle(out_dir, files, manifest, key)
    verify_bundle(read_bundle(out_dir), TrustStore([key.public_key()]))
    return GenerationReport(
        bundle=bundle, prompts=len(prompts), smoke=smoke, seconds=time.perf_counter() - t0
    )


def _manifest(
    name: str, version: int, variant: str, spec: GenerationSpec, files: list[FileData], model_file: str
) -> ModelManifest:
    return ModelManifest(
        task="generation",
        generation=spec,
        name=name,
        version=version,
        variant=variant,
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", "vocab"])],
        preprocessing=Preprocessing(kind="genai", max_tokens=spec.max_prompt_tokens, tokenizer=""),
        labels=list(GENERATION_LABELS),
        edges=HistogramEdges(
            confidence=[0.0, 1.0 + 1e-9], input_length=_PROMPT_EDGES, latency_ms=_TTFT_EDGES
        ),
        created=datetime.now(UTC).replace(microsecond=0),
        sha256="",
        size_bytes=0,
        output="logits",
        output_kind="logits",
        requires=Requirements(preprocessing="genai", task="generation", multi_file=True, min_runtime=2),
    )
