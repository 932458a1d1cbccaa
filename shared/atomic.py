"""Small state files written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes, *, prefix: str = ".tmp-", mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: written to a fresh temporary file beside it (``mkstemp``:
    a new name, created 0600, so a leftover or pre-created temp file is never reused), set to
    ``mode`` (default 0600, private: secrets rely on it), fsynced, renamed over ``path``, and
    the directory fsynced, so a crash leaves the old file or the new one, never a torn one.
    Raises ``OSError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
