"""``slmops models build``: MiniLM by default (figures table, JSON), its clear refusals, and
``--arch ngram`` keeping the old model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from slmops.cli import main
from slmops.cloud.factory.cache import CachedModel
from slmops.cloud.factory.weights import WHEEL
from slmops.shared.bundle import (
    TrustStore,
    load_private_key,
    load_public_key,
    new_keypair,
    read_bundle,
    resign_bundle,
)
from slmops.shared.errors import BundleError
from slmops.shared.runtime import verify_bundle


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--log-level", "error", *args])
    return result.exit_code, result.output


def test_build_without_weights_is_one_clear_line(tmp_path: Path) -> None:
    key, _ = new_keypair(tmp_path / "keys")
    empty = tmp_path / "airgap"
    empty.mkdir()
    code, out = _cli(
        "models", "build", "--out", str(tmp_path / "b"), "--key", str(key), "--weights", str(empty),
        "--no-cache",  # a cached build of the same inputs needs no weights: the session's cache holds one
    )  # fmt: skip
    assert code == 1
    assert out.startswith(f"Error: weights {empty}: holds neither {WHEEL} nor both of"), out
    assert len(out.strip().splitlines()) == 1


def test_build_unknown_variant(tmp_path: Path, minilm_weights_dir: Path | None) -> None:
    key, _ = new_keypair(tmp_path / "keys")
    args = ["--weights", str(minilm_weights_dir)] if minilm_weights_dir else []
    code, out = _cli(
        "models", "build", "--out", str(tmp_path / "b"), "--key", str(key), "--variants", "int4", *args
    )
    assert code == 1
    assert "unknown variants ['int4']; known: ['fp32', 'int8', 'int8-l3', 'int8-l3-ft']" in out


def test_build_one_minilm_variant_json(
    tmp_path: Path, minilm_weights_dir: Path | None, minilm_default: CachedModel
) -> None:
    """One variant built afresh (a subset of the default three: never taken from the cache).
    Its model bytes are those of the session's cached build of the same inputs (another
    process may have made that one): the build is deterministic; measured figures may differ.
    (The determinism check had a build of its own in test_factory_minilm.py: ~35 s under load.)"""
    key, pub = new_keypair(tmp_path / "keys")
    args = ["--weights", str(minilm_weights_dir)] if minilm_weights_dir else []
    out_dir = tmp_path / "b"
    code, out = _cli(
        "models", "build", "--out", str(out_dir), "--key", str(key), "--variants", "int8-l3", "--json", *args
    )
    assert code == 0, out
    doc = json.loads(out)
    (row,) = doc["variants"]
    assert row["variant"] == "int8-l3"
    assert row["layers"] == 3
    assert row["accuracy"] > 0.75
    assert row["agreement_with_fp32"] is None  # fp32 not built in this run
    assert row["rss_peak_mb"] > row["rss_load_mb"] > 0
    bundle = read_bundle(out_dir / "int8-l3")
    assert bundle.manifest.min_memory_mb == row["min_memory_mb"]
    verify_bundle(bundle, TrustStore([load_public_key(pub)]))
    for name in ("encoder.onnx", "head.onnx", "tokenizer.json"):
        assert (bundle.path / name).read_bytes() == (minilm_default.bundles["int8-l3"] / name).read_bytes(), (
            name
        )


def test_arch_ngram_keeps_the_old_model(tmp_path: Path) -> None:
    key, _ = new_keypair(tmp_path / "keys")
    code, out = _cli("models", "build", "--arch", "ngram", "--out", str(tmp_path / "b"), "--key", str(key))
    assert code == 0, out
    m = read_bundle(tmp_path / "b").manifest
    assert m.preprocessing.kind == "hashed_ngrams"
    assert not m.files
    assert "held-out" in out


def test_quantize_refuses_a_minilm_bundle(minilm_default: CachedModel, tmp_path: Path) -> None:
    """Its int8 variants come from `models build` (head fitted after quantizing), not from
    quantizing the fp32 bundle."""
    code, out = _cli(
        "models", "quantize", str(minilm_default.bundles["fp32"]), "--out", str(tmp_path / "q"),
        "--key", str(minilm_default.key_path),
    )  # fmt: skip
    assert code == 1
    assert "is a transformer bundle: its int8 variants are built by `slmops models build`" in out
    assert not (tmp_path / "q").exists()


def test_default_build_reuses_the_cached_build_signed_with_the_given_key(
    minilm_default: CachedModel, tmp_path: Path, minilm_weights_dir: Path | None
) -> None:
    """`models build` of the three default variants with the inputs the session's cached
    build has (seed 0, topics v1): the cached bundles copied and signed with --key, so they
    verify against that key and not the cache's own; model files byte-identical, figures
    those of the cached build; an --out that is not empty is refused before anything is
    written; `--variants` other than the default three builds afresh (the test above)."""
    key, pub = new_keypair(tmp_path / "keys")
    args = ["--weights", str(minilm_weights_dir)] if minilm_weights_dir else []
    out_dir = tmp_path / "b"
    code, out = _cli("models", "build", "--out", str(out_dir), "--key", str(key), "--json", *args)
    assert code == 0, out
    doc = json.loads(out)
    assert (doc["cache_hit"], doc["cache_entry"]) == (True, str(minilm_default.root))
    assert [v["variant"] for v in doc["variants"]] == ["fp32", "int8", "int8-l3"]
    assert doc["variants"] == minilm_default.report["variants"]
    mine = TrustStore([load_public_key(pub)])
    cache_key = TrustStore([load_public_key(minilm_default.pub_path)])
    for variant, cached in minilm_default.bundles.items():
        b = read_bundle(out_dir / variant)
        verify_bundle(b, mine)
        with pytest.raises(BundleError) as refused:
            verify_bundle(b, cache_key)
        assert refused.value.code == "unknown_key", (variant, refused.value)
        assert b.model_path.read_bytes() == read_bundle(cached).model_path.read_bytes()
    code, out = _cli("models", "build", "--out", str(out_dir), "--key", str(key), *args)
    assert code == 1
    assert f"output directory {str(out_dir)!r} is not empty" in out
    code, table = _cli("models", "build", "--out", str(tmp_path / "c"), "--key", str(key), *args)
    assert code == 0, table
    assert f"reused from {minilm_default.root} and signed with --key" in table


def test_a_damaged_cache_entry_is_not_signed_with_the_users_key(
    minilm_default: CachedModel, tmp_path: Path
) -> None:
    """The check `models build` runs on a cache entry before signing its bundles with --key
    (review: 10 bytes overwritten in a cached head.onnx were signed): an intact copy passes;
    a changed byte in one file, or a manifest the entry's key did not sign, fails it."""
    from dataclasses import replace

    from slmops.cloud.factory.cache import _intact

    copy = tmp_path / "entry"
    shutil.copytree(minilm_default.root, copy)
    entry = replace(
        minilm_default, root=copy, bundles={v: copy / "bundles" / v for v in minilm_default.bundles}
    )
    assert _intact(entry)
    head = copy / "bundles" / "int8" / "head.onnx"
    data = bytearray(head.read_bytes())
    data[-10:] = b"\x00" * 10
    head.write_bytes(bytes(data))
    assert not _intact(entry)
    shutil.copytree(minilm_default.root / "bundles" / "int8", copy / "bundles" / "int8", dirs_exist_ok=True)
    assert _intact(entry)
    other, _ = new_keypair(tmp_path / "other")
    resign_bundle(copy / "bundles" / "fp32", load_private_key(other))
    assert not _intact(entry)
