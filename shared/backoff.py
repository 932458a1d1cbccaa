"""The one exponential backoff: ``initial`` doubling per failure up to ``cap`` seconds, with
optional "equal jitter" (half the delay fixed, half random) so that many clients cut off
together do not retry in step."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
    """``delay(failures)`` is a pure function of the failure count; ``next()``/``reset()``
    keep the count for a caller that only sees one failure at a time.

    ``delay(n)`` = ``min(cap, initial * 2**(n-1))`` for ``n >= 1`` (``initial`` for 0), with
    ``jitter`` drawn uniformly from its upper half. Raises ``ValueError`` for a non-positive
    ``initial`` or a ``cap`` below it."""

    initial: float
    cap: float
    jitter: bool = False
    rng: random.Random = field(default_factory=random.Random, repr=False)
    failures: int = 0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError(f"initial must be a positive number of seconds, got {self.initial!r}")
        if self.cap < self.initial:
            raise ValueError(f"cap {self.cap!r} must not be below initial {self.initial!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row."""
        ceiling = min(self.cap, self.initial * 2.0 ** min(max(0, failures - 1), 60))
        if not self.jitter:
            return float(ceiling)
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def next(self) -> float:
        """Count one more failure and return the delay to wait for it."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """A success: the next failure starts from ``initial`` again."""
        self.failures = 0
