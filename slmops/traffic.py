"""``slmops traffic``: send real utterances from the factory's corpus (its held-out split, the
texts the model never trained on) to a node's ``/v1/predict``, at a steady rate, optionally
with the true label sent back as ``/v1/feedback`` (what the rollout's accuracy gate reads).

So the tour can show drift and rollouts without an app: a rollout judges a stage once the
canary (and the control, when the fleet has one) served ``min_samples`` (default 200)
predictions, so ``--count 400`` covers a one-node fleet's stage with room to spare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio

__all__ = ["TrafficReport", "send_traffic"]


@dataclass
class TrafficReport:
    url: str
    sent: int = 0
    answered: int = 0
    failed: int = 0
    feedback: int = 0
    right: int = 0
    seconds: float = 0.0
    models: dict[str, int] = field(default_factory=dict)
    last_error: str = ""

    def line(self) -> str:
        models = ", ".join(f"{m}: {n}" for m, n in sorted(self.models.items())) or "none"
        text = (
            f"sent {self.sent} texts to {self.url} in {self.seconds:.1f} s: {self.answered} answered "
            f"({models}), {self.failed} failed"
        )
        if self.feedback:
            text += f"; feedback sent for {self.feedback} (right {self.right / self.feedback:.1%})"
        if self.last_error:
            text += f"; last error: {self.last_error}"
        return text


async def send_traffic(
    url: str,
    *,
    count: int,
    rate: float,
    batch: int = 4,
    seed: int = 0,
    shift: tuple[str, ...] = (),
    factor: float = 4.0,
    feedback: bool = False,
) -> TrafficReport:
    """Send ``count`` texts to ``url`` (a node's base URL) in requests of ``batch`` texts,
    ``rate`` texts per second. ``shift``: topics made ``factor`` times as likely (a label
    shift the cloud should notice). Raises ``ValueError`` for an unknown topic; a node that
    cannot be reached is counted in ``failed`` (the report says the last error)."""
    from slmops.cloud.factory.corpus import load_topics, split_topics  # the cloud extra: the corpus
    from slmops.demo.traffic import Traffic

    split = split_topics(load_topics(), seed=seed)
    unknown = sorted(set(shift) - set(split.labels))
    if unknown:
        raise ValueError(f"unknown topic(s) {unknown}; topics: {', '.join(split.labels)}")
    traffic = Traffic(split.held_out_texts, split.held_out_labels, split.labels, seed=seed)
    mix = traffic.shifted(traffic.favoured(list(shift)), factor) if shift else traffic.natural()
    report = TrafficReport(url=url.rstrip("/"))
    t0 = time.monotonic()
    interval = batch / rate
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        next_at = t0
        while report.sent < count:
            picks = traffic.sample(mix, min(batch, count - report.sent))
            report.sent += len(picks)
            await _one(session, report, picks, split.labels, feedback)
            next_at += interval
            await anyio.sleep(max(0.0, next_at - time.monotonic()))
    report.seconds = time.monotonic() - t0
    return report


async def _one(
    session: aiohttp.ClientSession,
    report: TrafficReport,
    picks: list[tuple[str, int]],
    labels: list[str],
    feedback: bool,
) -> None:
    try:
        async with session.post(report.url + "/v1/predict", json={"texts": [t for t, _ in picks]}) as r:
            body: dict[str, Any] = await r.json(content_type=None)
            if r.status != 200:
                report.failed += len(picks)
                report.last_error = f"HTTP {r.status}: {body.get('error', body)}"
                return
        preds = body.get("predictions", [])
        report.answered += len(preds)
        model = body.get("model") or {}
        key = f"{model.get('name')} v{model.get('version')} {model.get('variant', '')}".strip()
        report.models[key] = report.models.get(key, 0) + len(preds)
        if feedback:
            for (_, truth), pred in zip(picks, preds, strict=False):
                body = {"prediction_id": pred["prediction_id"], "label": labels[truth]}
                async with session.post(report.url + "/v1/feedback", json=body) as r:
                    if r.status == 200:
                        report.feedback += 1
                        report.right += pred.get("label") == labels[truth]
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        report.failed += len(picks)
        report.last_error = f"{type(exc).__name__}: {exc}"[:200]
