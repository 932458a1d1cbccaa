"""Traffic for the demo: real utterances from the training corpus's held-out split, drawn with
a class mix per node, so a "shift" is a real change in what users ask about."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime

__all__ = ["Traffic", "raw_event_bytes"]


class Traffic:
    def __init__(
        self, texts: Sequence[str], labels: Sequence[int], label_names: Sequence[str], seed: int
    ) -> None:
        self.label_names = list(label_names)
        self.by_class: dict[int, list[str]] = {}
        for t, y in zip(texts, labels, strict=True):
            self.by_class.setdefault(y, []).append(t)
        self.classes = sorted(self.by_class)
        self.rng = random.Random(seed)

    def natural(self) -> dict[int, float]:
        """The held-out set's own class mix: what the model's reference profile describes."""
        return {c: float(len(self.by_class[c])) for c in self.classes}

    def shifted(self, favoured: Sequence[int], factor: float) -> dict[int, float]:
        """The natural mix with the ``favoured`` classes ``factor`` times as likely."""
        return {c: n * (factor if c in favoured else 1.0) for c, n in self.natural().items()}

    def favoured(self, names: Sequence[str], fallback: int = 2) -> list[int]:
        """Indices of ``names`` that exist, else the first ``fallback`` classes."""
        found = [self.label_names.index(n) for n in names if n in self.label_names]
        return found or self.classes[:fallback]

    def sample(self, mix: dict[int, float], n: int) -> list[tuple[str, int]]:
        classes = list(mix)
        picks = self.rng.choices(classes, weights=[mix[c] for c in classes], k=n)
        return [(self.rng.choice(self.by_class[c]), c) for c in picks]


def raw_event_bytes(fleet: str, node: str, text: str, pred: dict[str, object]) -> int:
    """Bytes one inference would cost as raw per-event telemetry (JSON with the input text),
    the thing slmops avoids sending."""
    event = {
        "fleet": fleet,
        "node": node,
        "time": datetime.now(UTC).isoformat(),
        "text": text,
        "label": pred.get("label"),
        "confidence": pred.get("confidence"),
        "latency_ms": 0.25,
        "model": pred.get("model"),
    }
    return len(json.dumps(event).encode())
