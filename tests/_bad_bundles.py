"""Bundles that are wrong in exactly one way, for the registry's push checks and the node's
refresh checks. Each maker writes a bundle directory and returns the ``BundleError.code`` a
verifier must answer with (``RefreshResult.code`` at the edge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import msgspec
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from _models import make_bundle
from slmops.shared.bundle import MANIFEST_FILE, MODEL_FILE, read_bundle, write_bundle
from slmops.shared.messages import ModelManifest

__all__ = ["BAD_BUNDLES", "BadBundle", "resign"]


class BadBundle(Protocol):
    """``maker(out_dir, trusted_key, version, name) -> expected code``."""

    def __call__(self, out: Path, key: Ed25519PrivateKey, version: int, name: str = ...) -> str: ...


def resign(path: Path, key: Ed25519PrivateKey, model: bytes | None = None, **changes: object) -> None:
    """Rewrite the bundle at ``path`` with manifest ``changes`` (and new model bytes), validly
    hashed and signed by ``key``: the bundle is then wrong only in what was changed."""
    b = read_bundle(path)
    manifest: ModelManifest = msgspec.structs.replace(b.manifest, **changes)
    write_bundle(path, model if model is not None else b.model_path.read_bytes(), manifest, key)


def bad_signature(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """The manifest was edited after signing (notes changed, signature kept)."""
    make_bundle(out, key, version=version, name=name)
    doc = json.loads((out / MANIFEST_FILE).read_text())
    doc["notes"] = "edited after signing"
    (out / MANIFEST_FILE).write_text(json.dumps(doc))
    return "bad_signature"


def unknown_key(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """Validly signed, by a key nobody trusts."""
    make_bundle(out, Ed25519PrivateKey.generate(), version=version, name=name)
    return "unknown_key"


def hash_mismatch(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """The model's bytes changed (same size) after the manifest was signed."""
    make_bundle(out, key, version=version, name=name)
    data = bytearray((out / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (out / MODEL_FILE).write_bytes(bytes(data))
    return "hash_mismatch"


def truncated(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """The model file lost its tail."""
    make_bundle(out, key, version=version, name=name)
    data = (out / MODEL_FILE).read_bytes()
    (out / MODEL_FILE).write_bytes(data[: len(data) // 2])
    return "truncated"


def load_failed(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """Signed and hashed correctly, but the model is not ONNX."""
    make_bundle(out, key, version=version, name=name)
    resign(out, key, model=b"this is not an onnx model" * 10)
    return "load_failed"


def smoke_failed(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """A smoke test expects an answer the model does not give."""
    b = make_bundle(out, key, version=version, name=name)
    tests = list(b.manifest.smoke_tests)
    first = tests[0]
    wrong = next(label for label in b.manifest.labels if label != first.label)
    tests[0] = msgspec.structs.replace(first, label=wrong)
    resign(out, key, smoke_tests=tests)
    return "smoke_failed"


def incompatible(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """A loadable model whose input is not one the runtime feeds (``tokens``, not ``ids``)."""
    make_bundle(out, key, version=version, name=name)
    model = onnx.load_from_string((out / MODEL_FILE).read_bytes())
    for value in model.graph.input:
        if value.name == "ids":
            value.name = "tokens"
    for node in model.graph.node:
        node.input[:] = ["tokens" if i == "ids" else i for i in node.input]
    resign(out, key, model=model.SerializeToString())
    return "incompatible"


def too_large(out: Path, key: Ed25519PrivateKey, version: int, name: str = "testclf") -> str:
    """Needs more memory than any test device has."""
    make_bundle(out, key, version=version, name=name)
    resign(out, key, min_memory_mb=1_000_000)
    return "too_large"


BAD_BUNDLES: dict[str, BadBundle] = {
    f.__name__: f
    for f in (
        bad_signature,
        unknown_key,
        hash_mismatch,
        truncated,
        load_failed,
        smoke_failed,
        incompatible,
        too_large,
    )
}
