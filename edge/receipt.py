"""The durable loss receipt: how many inferences this node answered but could not store.

When the disk fails (ENOSPC, I/O errors) SQLite cannot take event rows, yet the node keeps
answering (issue 13). Each such inference is counted here, in a small file whose space was
reserved when the node started (``SIZE`` bytes written in full, then only ever rewritten in
place), so recording a loss never needs a free block — and the count survives ``kill -9``
during the spell: ``os.pwrite`` hands the bytes to the kernel before the answer is sent (the
same promise as SQLite's WAL with ``synchronous=NORMAL``; a power cut is not covered).

Format: two 64-byte slots (offsets 0 and ``_SLOT_GAP``) written alternately, each
``magic, version, generation, lost, install, crc32``; the valid slot with the highest
generation wins, so a torn write of one slot leaves the other. ``lost`` is cumulative for the
node install ``install``; the buffer moves it into aggregates (``dropped_inferences``) and
remembers how much it moved in SQLite, in the same transaction as the aggregate.

A node that starts on a disk already full has no reserved page yet (and no install: the
database cannot open). Its receipt is then an empty file whose *length* is the count: lost
inferences = length - ``_EARLY_BASE``, grown with ``ftruncate``, which changes only the
inode (a sparse file: no data block), so it works on a full tmpfs or ext4 and survives
``kill -9`` and restarts during the spell (``open_early``). When the database opens, the
count moves into a slot of the new install (one 64-byte write: before it the length still
counts, after it the slot does) and the file shrinks to its reserved page.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from pathlib import Path

import structlog

__all__ = ["LossReceipt"]

log = structlog.get_logger(__name__)

_MAGIC = b"SLRC"
_VERSION = 1
_HEAD = struct.Struct("<4sIQQ32s")
_CRC = struct.Struct("<I")
_SLOT_GAP = 512
#: Bytes reserved on disk (one page): both slots live inside it.
SIZE = 4096
#: Length of an early receipt (``open_early``) that counts 0: far above ``SIZE``, so a
#: reserved file whose slots were never written (a crash while creating it) is not read as
#: a count.
_EARLY_BASE = 1 << 20


class LossReceipt:
    """``open(install)`` reads (or creates and preallocates) the file; ``add(n)`` counts ``n``
    lost inferences in place. ``lost`` is the cumulative count of install ``install``.

    Raises ``OSError`` when the file cannot be created or written (a dying disk)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lost = 0
        self.install = ""
        self._generation = 0
        self._fd: int | None = None
        #: Counting in the file's length (``open_early``), not in a slot.
        self.early = False

    def open(self, install: str, floor: int = 0) -> None:
        """Open for node install ``install``. A receipt of another install (its database was
        lost, so its count can no longer be told apart) or below ``floor`` (what the database
        says was already reported) restarts at ``floor``. An early receipt (``open_early``)
        becomes this install's, its count added to ``floor``."""
        self.close()
        created = not self.path.exists()
        if created:
            self._create()
        self._fd = os.open(self.path, os.O_RDWR)
        found = self._read()
        early = self._early_count() if found is None else None
        if early is not None:
            self._generation, self.install, self.lost, self.early = 0, install, floor + early, False
            self._write()  # from here the slot counts, not the length
            os.ftruncate(self._fd, SIZE)
            log.warning("loss_receipt_early_moved", path=str(self.path), install=install, lost=early)
            return
        if found is None:
            if not created:
                log.warning("loss_receipt_unreadable", path=str(self.path))
            found = (0, 0, "")
        self._generation, self.lost, self.install = found
        if self.install != install or self.lost < floor:
            if self.lost:
                log.warning(
                    "loss_receipt_reset", path=str(self.path), old_install=self.install, lost=self.lost
                )
            self.install, self.lost = install, floor
            self._write()

    def open_early(self) -> None:
        """Open while the database cannot (a start on a full or failing disk): a receipt
        with a written slot counts on in place, for the install it names; a missing one is
        made early (an empty file counting in its length, see the module docstring), as is
        one found early from a previous start. Raises ``OSError`` when neither works (an
        unreadable reserved file, no inode left)."""
        self.close()
        if not self.path.exists():
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, _EARLY_BASE)
            except OSError:
                os.close(fd)
                os.unlink(self.path)
                raise
            os.close(fd)
        self._fd = os.open(self.path, os.O_RDWR)
        found = self._read()
        if found is not None:
            self._generation, self.lost, self.install = found
            self.early = False
            return
        early = self._early_count()
        if early is None:
            self.close()
            raise OSError(f"loss receipt {self.path} is unreadable and too small to count in its length")
        self.lost, self.install, self.early = early, "", True

    def _early_count(self) -> int | None:
        if self._fd is None:
            raise OSError(f"loss receipt {self.path} is not open")
        size = os.fstat(self._fd).st_size
        return size - _EARLY_BASE if size >= _EARLY_BASE else None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def add(self, n: int) -> None:
        """Count ``n`` more lost inferences, rewriting the next slot in place."""
        if n <= 0:
            return
        self.lost += n
        try:
            self._write()
        except OSError:
            self.lost -= n
            raise

    def _create(self) -> None:
        """Reserve the file's space: write it in full under a temporary name, then rename."""
        tmp = self.path.with_name(self.path.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def _slot(self, generation: int) -> bytes:
        head = _HEAD.pack(_MAGIC, _VERSION, generation, self.lost, self.install.encode().ljust(32, b"\0"))
        return head + _CRC.pack(zlib.crc32(head))

    def _write(self) -> None:
        if self._fd is None:
            raise OSError(f"loss receipt {self.path} is not open")
        if self.early:  # the length is the count: an inode change, no data block
            os.ftruncate(self._fd, _EARLY_BASE + self.lost)
            return
        self._generation += 1
        data = self._slot(self._generation)
        if os.pwrite(self._fd, data, (self._generation % 2) * _SLOT_GAP) != len(data):
            raise OSError(f"loss receipt {self.path}: short write")

    def _read(self) -> tuple[int, int, str] | None:
        if self._fd is None:  # runtime state, not an invariant: say so even under python -O
            raise OSError(f"loss receipt {self.path} is not open")
        best: tuple[int, int, str] | None = None
        for offset in (0, _SLOT_GAP):
            raw = os.pread(self._fd, _HEAD.size + _CRC.size, offset)
            if len(raw) < _HEAD.size + _CRC.size:
                continue
            head, (crc,) = raw[: _HEAD.size], _CRC.unpack(raw[_HEAD.size :])
            magic, version, generation, lost, install = _HEAD.unpack(head)
            if magic != _MAGIC or version != _VERSION or zlib.crc32(head) != crc:
                continue
            if best is None or generation > best[0]:
                best = (generation, lost, install.rstrip(b"\0").decode("ascii", "replace"))
        return best
