"""Exactly-once counting of a node's aggregates by ``seq`` (docs/architecture.md §5).

Per node the cloud keeps ``contiguous`` — every seq ``1..contiguous`` has been applied — and
``runs``, the applied seqs above it (those that arrived out of order) as sorted, disjoint
inclusive ranges ``(first, last)``. So:

* a seq ``<= contiguous`` or inside a run is a duplicate and is dropped;
* any other seq is applied once, even when it is late (below the highest seq seen): it fills a
  hole, and when the hole below the first run closes, ``contiguous`` advances over the run;
* the holes between ``contiguous`` and the highest seq are the *missing* seqs, reported as gaps.

Memory is one pair per hole, not one integer per seq (issue 18): a node that reconnects and
sends 1,000 windows out of order above a hole keeps a single run, not a set of 1,000. (Until
issue 18 this was a sorted list of every out-of-order seq; a stored state of that form, key
``pending``, is read into runs.)

The seqs held in runs are bounded (``max_pending``): when they grow past the bound, the oldest
hole is declared lost (``abandoned``) and ``contiguous`` jumps over it; an aggregate that still
arrives for an abandoned seq afterwards cannot be told from a duplicate and is counted as
``too_late`` rather than applied. With the default bound of 4096 this needs a node to resend a
window after 4096 later ones were applied. Runs are therefore at most ``max_pending`` too (a
hostile node sending every other seq), and normally one or two.

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

from bisect import bisect_right
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
    """The applied seqs of one node install (persisted with the node's state)."""

    contiguous: int = 0
    #: Applied seqs above ``contiguous + 1``: sorted, disjoint, non-adjacent ``(first, last)``.
    runs: list[tuple[int, int]] = []
    #: The form stored before issue 18 (one entry per out-of-order seq): read into ``runs`` on
    #: decode, always written empty.
    legacy_pending: list[int] = msgspec.field(default_factory=list, name="pending")
    #: Seqs given up on (holes older than the pending bound).
    abandoned: int = 0
    #: Times a seq arrived beyond ``high + 1`` (a new gap opened).
    gaps_opened: int = 0
    #: Quarantined jump seqs in a row (``jump``), oldest first; emptied by an applied seq.
    jumps: list[int] = []
    #: Seqs never expected: below a fresh tracker's first seq, or jumped over by a confirmed
    #: jump (not missing, not counted).
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.legacy_pending:
            old, self.legacy_pending = self.legacy_pending, []
            for seq in sorted(set(old)):
                if seq == self.contiguous + 1:
                    self.contiguous = seq
                elif not self.seen(seq):
                    self._place(seq)

    @property
    def high(self) -> int:
        """The highest seq applied."""
        return self.runs[-1][1] if self.runs else self.contiguous

    @property
    def held(self) -> int:
        """How many applied seqs lie above ``contiguous`` (in runs)."""
        return sum(b - a + 1 for a, b in self.runs)

    @property
    def pending(self) -> list[int]:
        """Every applied seq above ``contiguous``, ascending (for inspection: O(held))."""
        return [s for a, b in self.runs for s in range(a, b + 1)]

    @property
    def missing(self) -> int:
        """Seqs below ``high`` not applied yet (open holes)."""
        return self.high - self.contiguous - self.held

    def seen(self, seq: int) -> bool:
        if seq <= self.contiguous:
            return True
        i = bisect_right(self.runs, (seq, seq)) - 1  # the last run starting at or below seq
        if i + 1 < len(self.runs) and self.runs[i + 1][0] == seq:
            return True
        return i >= 0 and self.runs[i][0] <= seq <= self.runs[i][1]

    def _place(self, seq: int) -> None:
        """Put a seq above ``contiguous + 1``, not seen, into the runs (merging neighbours)."""
        runs = self.runs
        i = bisect_right(runs, (seq, seq))  # runs[:i] start at or below seq (all end below it)
        joins_left = i > 0 and runs[i - 1][1] == seq - 1
        joins_right = i < len(runs) and runs[i][0] == seq + 1
        if joins_left and joins_right:
            runs[i - 1 : i + 1] = [(runs[i - 1][0], runs[i][1])]
        elif joins_left:
            runs[i - 1] = (runs[i - 1][0], seq)
        elif joins_right:
            runs[i] = (seq, runs[i][1])
        else:
            runs.insert(i, (seq, seq))

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
            if self.runs and self.runs[0][0] == seq + 1:  # close up with the run that follows
                self.contiguous = self.runs.pop(0)[1]
        else:
            self._place(seq)
            while self.runs and self.held > max_pending:
                # Give up on the oldest hole: jump over it to the end of the first run.
                first, last = self.runs.pop(0)
                self.abandoned += first - self.contiguous - 1
                self.contiguous = last
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
        self.contiguous, self.runs = first - 1, []
        self.jumps = []
        return False

    def missing_ranges(self, limit: int = 20) -> list[tuple[int, int]]:
        """Up to ``limit`` holes as inclusive ``(first, last)`` seq ranges, oldest first."""
        out: list[tuple[int, int]] = []
        prev = self.contiguous
        for first, last in self.runs:
            out.append((prev + 1, first - 1))  # runs are never adjacent: a hole before each
            if len(out) >= limit:
                break
            prev = last
        return out
