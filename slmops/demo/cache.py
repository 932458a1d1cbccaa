"""The demo's built default model, cached between runs and keyed by everything that goes into
the build, so a second ``slmops demo`` skips the build (and, for a downloaded base model, the
download) while any change to the factory, the corpus or the libraries builds afresh.

Key: sha256 over the slmops version, the seed, the source of every module of
``slmops.cloud.factory`` (the builder itself), every corpus file, and the versions of numpy,
onnx and onnxruntime. An entry is a directory ``<root>/<key>/`` holding ``keys/`` (the demo
fleet's key pair: the bundle is signed by it) and ``bundle/``, made in a temporary directory
and renamed into place, so a killed build leaves no half entry. Root: ``$SLMOPS_CACHE_DIR/demo``,
else ``$XDG_CACHE_HOME/slmops/demo``, else ``~/.cache/slmops/demo``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedModel", "build_key", "cache_root", "cached_model"]


def cache_root() -> Path:
    base = os.environ.get("SLMOPS_CACHE_DIR")
    if base:
        return Path(base) / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slmops" / "demo"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def build_key(seed: int, *, corpus_dir: Path | None = None) -> str:
    """The inputs' hash (hex, 16 chars)."""
    import slmops.cloud.factory as factory
    from slmops.cloud.factory.corpus import default_corpus_dir

    h = hashlib.sha256()
    h.update(f"slmops={_version('slmops')};seed={seed};".encode())
    for dist in ("numpy", "onnx", "onnxruntime", "tokenizers"):
        h.update(f"{dist}={_version(dist)};".encode())
    for folder, pattern in (
        (Path(factory.__file__).parent, "*.py"),
        (corpus_dir or default_corpus_dir(), "*"),
    ):
        for f in sorted(folder.rglob(pattern)):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CachedModel:
    bundle: Path
    private_key: Path
    public_key: Path
    #: True when this run built it (cold), False when it came from the cache (warm).
    built: bool
    key: str


def cached_model(
    seed: int, build: Callable[[Path, Path], Path], *, root: Path | None = None, use_cache: bool = True
) -> CachedModel:
    """The cached entry for ``seed``, built with ``build(keys_dir, out_dir) -> bundle_dir`` when
    missing. ``use_cache=False`` builds into a fresh temporary entry that is not kept."""
    key = build_key(seed)
    root = root or cache_root()
    entry = root / key
    if use_cache and (entry / "done").exists():
        return _entry(entry, key, built=False)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        bundle = build(tmp / "keys", tmp / "bundle")
        if bundle != tmp / "bundle":
            raise ValueError(f"build wrote its bundle to {bundle}, not {tmp / 'bundle'}")
        (tmp / "done").write_text(key + "\n")
        if not use_cache:
            return _entry(tmp, key, built=True)
        try:
            tmp.rename(entry)
        except OSError:  # another run finished the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return _entry(entry, key, built=True)
        return _entry(entry, key, built=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _entry(path: Path, key: str, *, built: bool) -> CachedModel:
    keys = path / "keys"
    private = next(keys.glob("*.key"))
    return CachedModel(
        bundle=path / "bundle",
        private_key=private,
        public_key=private.with_suffix(".pub"),
        built=built,
        key=key,
    )
