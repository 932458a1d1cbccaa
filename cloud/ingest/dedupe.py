"""Exactly-once counting of a node's aggregates by ``seq`` (docs/architecture.md §5).

Per node the cloud keeps ``contiguous`` — every seq ``1..contiguous`` has been applied — and the
sorted set ``pending`` of applied seqs above it (those that arrived out of order). So:

* a seq ``<= contiguous`` or in ``pending`` is a duplicate and is dropped;
* any other seq is applied once, even when it is late (below the highest seq seen): it fills a
  hole, and when the hole below ``pending`` closes, ``contiguous`` advances over it;
* the holes between ``contiguous`` and the highest seq are the *missing* seqs, reported as gaps.

``pending`` is bounded (``max_pending``): when it grows past the bound, the oldest hole is
declared lost (``abandoned``) and ``contiguous`` jumps over it; an aggregate that still arrives
for an abandoned seq afterwards cannot be told from a duplicate and is counted as ``too_late``
rather than applied. With the default bound of 4096 this needs a node to resend a window after
4096 later ones were applied.

Seq jumps are bounded (``jump``, issue 13): a node numbers its aggregates one by one, and at
most ``max_jump`` of them (the telemetry stream's per-node message cap, 100,000) can wait in
the stream unapplied, so a seq more than ``max_jump`` above the highest applied one is not
traffic in flight. It is quarantined: the caller dead-letters it and reports it; it is not
applied and opens no hole (a forged seq of 10^12 no longer leaves 10^12 "missing" for good).
Two cases are not jumps: the first seq of a fresh tracker (the cloud may see a node first long
after its install started, e.g. after losing its state: the seqs below are ``skipped``, never
missing), and a confirmed jump — ``JUMP_CONFIRM`` quarantined seqs in a row, each above the
last and within ``max_jump`` of it, with no applied seq between them (the node really moved
on, e.g. its telemetry aged out of the stream while the cloud was down longer than the
stream keeps it): the tracker re-bases below the first of them, the holes it had become
``abandoned``, the seqs jumped over ``skipped``, and the quarantined ones (in the dead-letter
stream) are the only new holes.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from enum import Enum

import msgspec

__all__ = ["JUMP_CONFIRM", "Admit", "SeqTracker"]

#: Quarantined jumps in a row (each above the last, within the bound) that re-base a tracker.
JUMP_CONFIRM = 3


class Admit(Enum):
    NEW = "new"  #: the next seq, or above the highest seen
    LATE = "late"  #: fills a hole below the highest seq seen
    DUPLICATE = "duplicate"


class SeqTracker(msgspec.Struct, kw_only=True):
    """The applied seqs of one node (persisted with the node's state)."""

    contiguous: int = 0
    pending: list[int] = []
    #: Seqs given up on (holes older than the pending bound).
    abandoned: int = 0
    #: Times a seq arrived beyond ``high + 1`` (a new gap opened).
    gaps_opened: int = 0
    #: Quarantined jump seqs in a row (``jump``), oldest first; emptied by an applied seq.
    jumps: list[int] = []
    #: Seqs never expected: below a fresh tracker's first seq, or jumped over by a confirmed
    #: jump (not missing, not counted).
    skipped: int = 0

    @property
    def high(self) -> int:
        """The highest seq applied."""
        return self.pending[-1] if self.pending else self.contiguous

    @property
    def missing(self) -> int:
        """Seqs below ``high`` not applied yet (open holes)."""
        return self.high - self.contiguous - len(self.pending)

    def seen(self, seq: int) -> bool:
        if seq <= self.contiguous:
            return True
        i = bisect_left(self.pending, seq)
        return i < len(self.pending) and self.pending[i] == seq

    def admit(self, seq: int, max_pending: int = 4096) -> Admit:
        """Record ``seq`` as applied unless already seen. Raises ``ValueError`` if ``seq < 1``."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"seq must be an int >= 1, got {seq!r}")
        if self.seen(seq):
            return Admit.DUPLICATE
        self.jumps = []
        high = self.high
        kind = Admit.LATE if seq < high else Admit.NEW
        if seq > high + 1:
            self.gaps_opened += 1
        if seq == self.contiguous + 1:
            self.contiguous = seq
            # Close up with the out-of-order seqs that now follow on.
            n = 0
            while n < len(self.pending) and self.pending[n] == self.contiguous + 1:
                self.contiguous += 1
                n += 1
            if n:
                del self.pending[:n]
        else:
            insort(self.pending, seq)
            while len(self.pending) > max_pending:
                # Give up on the oldest hole: jump over it to the first pending run.
                first = self.pending.pop(0)
                self.abandoned += first - self.contiguous - 1
                self.contiguous = first
                while self.pending and self.pending[0] == self.contiguous + 1:
                    self.contiguous = self.pending.pop(0)
        return kind

    def jump(self, seq: int, max_jump: int) -> bool:
        """True when ``seq`` is a jump to quarantine: more than ``max_jump`` above the highest
        applied seq, not the first seq of a fresh tracker, not a confirmed jump (module
        docstring). A fresh tracker's first seq above ``max_jump``, or a confirmed jump,
        re-bases the tracker (``skipped``) and returns False: ``admit`` it next. Call only
        for a seq not ``seen``."""
        high = self.high
        if seq <= high + max_jump:
            return False
        if high == 0 and not self.abandoned and not self.skipped:  # first sight of this install
            self.skipped += seq - 1
            self.contiguous = seq - 1
            return False
        if self.jumps and self.jumps[-1] < seq <= self.jumps[-1] + max_jump:
            self.jumps.append(seq)
        else:
            self.jumps = [seq]
        if len(self.jumps) < JUMP_CONFIRM:
            return True
        first = self.jumps[0]
        self.abandoned += self.missing
        self.skipped += first - 1 - high
        self.contiguous, self.pending = first - 1, []
        self.jumps = []
        return False

    def missing_ranges(self, limit: int = 20) -> list[tuple[int, int]]:
        """Up to ``limit`` holes as inclusive ``(first, last)`` seq ranges, oldest first."""
        out: list[tuple[int, int]] = []
        prev = self.contiguous
        for seq in self.pending:
            if seq > prev + 1:
                out.append((prev + 1, seq - 1))
                if len(out) >= limit:
                    break
            prev = seq
        return out
