"""The data directory's lock: one running node per directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import structlog

from slmops.edge.errors import DataDirInUse

__all__ = ["DataDirLock"]

log = structlog.get_logger(__name__)


class DataDirLock:
    """An exclusive ``flock`` on ``<data>/node.lock`` for the node's lifetime: a second node
    on the same directory would hand out the same seqs. The kernel drops the lock when the
    process dies, even by ``kill -9``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "node.lock"
        self.fd: int | None = None

    def __enter__(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise DataDirInUse(str(self.path.parent), holder) from exc
        try:  # who holds it, for the error above; a full disk cannot take it (nor must it stop us)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        except OSError as exc:
            log.warning("lock_pid_not_written", path=str(self.path), error=str(exc))
        self.fd = fd

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None
