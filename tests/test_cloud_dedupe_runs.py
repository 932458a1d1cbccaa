"""The cloud's per-install seq tracker keeps memory per hole, not per seq (issue 18), and
decides exactly as a plain set of applied seqs would."""

from __future__ import annotations

import itertools
import random

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.cloud.ingest.dedupe import Admit, SeqTracker


def test_a_node_reconnecting_with_1000_out_of_order_seqs_keeps_one_run_not_1000() -> None:
    t = SeqTracker()
    for s in range(1, 101):
        t.admit(s)
    burst = list(range(102, 1102))  # 101 is lost on the way; 1,000 arrive shuffled
    random.Random(7).shuffle(burst)
    assert all(t.admit(s) is not Admit.DUPLICATE for s in burst)
    assert t.runs == [(102, 1101)]
    assert (t.contiguous, t.high, t.missing, t.missing_ranges()) == (100, 1101, 1, [(101, 101)])
    assert all(t.admit(s) is Admit.DUPLICATE for s in burst[:50])
    stored = msgspec.msgpack.encode(t)
    assert len(stored) < 100, len(stored)  # was ~3 kB: 1,000 integers
    assert t.admit(101) is Admit.LATE
    assert (t.contiguous, t.runs, t.missing) == (1101, [], 0)


def test_a_state_stored_before_issue_18_is_read_into_runs() -> None:
    old = msgspec.msgpack.encode({"contiguous": 4, "pending": [6, 7, 8, 10, 5], "abandoned": 2})
    t = msgspec.msgpack.decode(old, type=SeqTracker)
    # 5 closes up with contiguous; 6..8 follow on; 10 stays above the hole 9.
    assert (t.contiguous, t.runs, t.abandoned, t.missing_ranges()) == (8, [(10, 10)], 2, [(9, 9)])
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=SeqTracker)
    assert (again.contiguous, again.runs, again.legacy_pending) == (8, [(10, 10)], [])


def test_a_hostile_every_other_seq_stays_bounded_by_max_pending() -> None:
    t = SeqTracker()
    for s in range(2, 2 + 2 * 200, 2):  # every other seq: every one is a run of its own
        t.admit(s, max_pending=16)
    assert len(t.runs) <= 16
    assert t.held <= 16
    assert t.abandoned == 200 - 16


class _Oracle:
    """The plain meaning: the set of applied seqs, the same bound on seqs held above the
    contiguous prefix (oldest hole abandoned first)."""

    def __init__(self) -> None:
        self.contiguous, self.held, self.abandoned = 0, set[int](), 0

    def admit(self, seq: int, bound: int) -> Admit:
        if seq <= self.contiguous or seq in self.held:
            return Admit.DUPLICATE
        kind = Admit.LATE if seq < max(self.held, default=self.contiguous) else Admit.NEW
        self.held.add(seq)
        self._advance()
        while len(self.held) > bound:
            first = min(self.held)
            self.abandoned += first - self.contiguous - 1
            self.contiguous = first - 1
            self._advance()
        return kind

    def _advance(self) -> None:
        while self.contiguous + 1 in self.held:
            self.contiguous += 1
            self.held.remove(self.contiguous)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=200), st.integers(16, 24))
def test_runs_decide_exactly_as_a_set_of_seqs(seqs: list[int], bound: int) -> None:
    t, o = SeqTracker(), _Oracle()
    for s in seqs:
        assert t.admit(s, bound) is o.admit(s, bound), s
        assert (t.contiguous, set(t.pending), t.abandoned) == (o.contiguous, o.held, o.abandoned)
        assert all(a <= b and b + 1 < c for (a, b), (c, _) in itertools.pairwise(t.runs))
        assert not t.runs or t.runs[0][0] > t.contiguous + 1
    assert t.missing == (max(o.held, default=o.contiguous) - o.contiguous - len(o.held))
