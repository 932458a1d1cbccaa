"""False drift events per fleet-day on a synthetic 10,000-node fleet (issue 14's goal: ≤ 1).

The fleet sends one aggregate per node per 1-minute window for a day (1,440 windows) of
stationary traffic with every signal on: class prior, confidence, input length, latency,
error rate, accuracy (app feedback on 5% of inferences) and the out-of-scope shares (low
confidence, foreign script, unknown token). Each node has its own class mix (Dirichlet around
the fleet's) and window size (100..2000 inferences), as in ``SyntheticFleet``.

The counts of a whole round are drawn at once with numpy (vectorised multinomials across the
nodes), turned into ``TelemetryAggregate`` messages, and fed to the service's real
``DriftDetector`` one by one: nothing of the detector is simulated. The first
``SETTLE`` windows (node baselines take 20, the production baseline 5 rounds) are not
counted; false events per fleet-day = drift events opened after them × 1,440 / windows
counted. At 10,000 nodes, 85 windows (850,000 aggregates) took ~6 min of one core on the
development machine (28-32 min of wall time under the load of other work), so a whole day
would take ~1.7 h: ``slmops bench drift`` runs 60 counted windows, and not with ``--quick``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np

from slmops.bench._fleet import (
    CONF_EDGES,
    CONF_P,
    LAT_EDGES,
    LAT_P,
    LEN_EDGES,
    LEN_P,
    MODEL,
    PRIOR,
    T0,
    _cond,
    manifest_for,
)
from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    OOS_CELLS,
    OOS_FOREIGN_SCRIPT,
    OOS_LOW_CONFIDENCE,
    OOS_UNKNOWN_TOKEN,
    ModelManifest,
    OutOfScopeSpec,
    Privacy,
    TelemetryAggregate,
)

__all__ = ["DAY_WINDOWS", "SETTLE", "fleet_day", "oos_manifest", "oos_probs"]

#: 1-minute windows in a day.
DAY_WINDOWS = 1440
#: Windows before counting: node baselines (20 tested windows) and the production baseline.
SETTLE = 25
LABELS = ["greeting", "billing", "support", "sales", "other"]
#: Out-of-scope sign rates of the stationary traffic (independent signs).
_OOS = {OOS_LOW_CONFIDENCE: 0.05, OOS_FOREIGN_SCRIPT: 0.01, OOS_UNKNOWN_TOKEN: 0.02}
_FEEDBACK_SHARE = 0.05


def oos_probs(rates: dict[int, float] = _OOS) -> np.ndarray:
    """The ``OOS_CELLS`` cell probabilities of independent signs (``OOS_*`` bit -> rate)."""
    p = np.ones(OOS_CELLS)
    for cell in range(OOS_CELLS):
        for bit in (OOS_LOW_CONFIDENCE, OOS_FOREIGN_SCRIPT, OOS_UNKNOWN_TOKEN):
            rate = rates.get(bit, 0.0)
            p[cell] *= rate if cell & bit else 1 - rate
    return p


def oos_manifest(
    rates: dict[int, float] = _OOS, *, unknown: bool = True, count: int = 50_000
) -> ModelManifest:
    """The bench manifest with an ``OutOfScopeSpec`` whose shares are ``rates`` (the
    unknown-token share only when ``unknown``: a model that counts it)."""
    m = manifest_for()
    m.out_of_scope = OutOfScopeSpec(
        threshold=0.5,
        rate=rates.get(OOS_LOW_CONFIDENCE, 0.0),
        scripts=["LATIN"],
        low_confidence_share=rates.get(OOS_LOW_CONFIDENCE, 0.0),
        foreign_script_share=rates.get(OOS_FOREIGN_SCRIPT, 0.0),
        unknown_token_share=rates.get(OOS_UNKNOWN_TOKEN, 0.0) if unknown else None,
        count=count,
    )
    return m


class _Round:
    """One round's counts for every node, drawn at once."""

    def __init__(
        self, rng: np.random.Generator, sizes: np.ndarray, pred_p: np.ndarray, mix: np.ndarray
    ) -> None:
        n = sizes
        self.classes = rng.multinomial(n, pred_p).tolist()
        self.conf = rng.multinomial(n, CONF_P).tolist()
        self.length = rng.multinomial(n, LEN_P).tolist()
        self.latency = rng.multinomial(n, LAT_P).tolist()
        self.errors = rng.binomial(n, 0.005).tolist()
        self.oos = rng.multinomial(n, oos_probs()).tolist()
        fed = rng.binomial(n, _FEEDBACK_SHARE)
        truth = rng.multinomial(fed, mix)  # (nodes, classes)
        cond = _cond()  # P(pred = i | true = j)
        self.feedback = [
            rng.multinomial(truth[:, j], cond[:, j]).tolist() for j in range(len(LABELS))
        ]  # per true class j: (nodes, predicted)


def fleet_day(
    nodes: int = 10_000,
    windows: int = DAY_WINDOWS + SETTLE,
    seed: int = 1,
    config: DriftConfig | None = None,
    one_size: int | None = None,
) -> dict[str, object]:
    """Run ``windows`` 1-minute windows of ``nodes`` stationary nodes through a real
    ``DriftDetector``. Returns the opened drift events after ``SETTLE`` (by scope and
    signal), the windows counted, false events per fleet-day, and seconds taken.
    ``one_size``: every node's window holds that many inferences (fewer calibrations: tests)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    mix = rng.dirichlet(PRIOR * 200.0, size=nodes)
    sizes = rng.choice([100, 200, 400, 800, 2000], size=nodes, p=[0.2, 0.3, 0.25, 0.15, 0.1])
    if one_size is not None:
        sizes[:] = one_size
    pred_p = mix @ _cond().T
    names = [f"node-{i:05d}" for i in range(nodes)]
    det = DriftDetector(config or DriftConfig(), clock=lambda: datetime.now(UTC))
    det.add_group("fleetday", MODEL, oos_manifest())
    privacy = Privacy(k=5)
    events: dict[str, int] = {}
    opened_after = 0
    for w in range(1, windows + 1):
        r = _Round(rng, sizes, pred_p, mix)
        start = T0 + timedelta(minutes=w)
        end = start + timedelta(minutes=1)
        for i in range(nodes):
            n = int(sizes[i])
            feedback = {
                truth: {p: c for p, c in zip(LABELS, r.feedback[j][i], strict=True) if c}
                for j, truth in enumerate(LABELS)
            }
            agg = TelemetryAggregate(
                fleet="fleetday",
                node=names[i],
                model=MODEL,
                seq=w,
                window_start=start,
                window_end=end,
                count=n,
                errors=r.errors[i],
                class_counts=dict(zip(LABELS, r.classes[i], strict=True)),
                confidence=Histogram(edges=CONF_EDGES, counts=r.conf[i]),
                input_length=Histogram(edges=LEN_EDGES, counts=r.length[i]),
                latency_ms=Histogram(edges=LAT_EDGES, counts=r.latency[i]),
                feedback={t: p for t, p in feedback.items() if p},
                privacy=privacy,
                out_of_scope=r.oos[i],
            )
            for e in det.observe(agg):
                if e.kind == "drift" and e.state == "opened" and w > SETTLE:
                    opened_after += 1
                    key = f"{e.scope}:{e.signal}"
                    events[key] = events.get(key, 0) + 1
    counted = max(0, windows - SETTLE)
    return {
        "nodes": nodes,
        "windows_counted": counted,
        "node_windows": nodes * counted,
        "false_events": opened_after,
        "false_per_fleet_day": round(opened_after * DAY_WINDOWS / counted, 3) if counted else None,
        "by_scope_signal": dict(sorted(events.items())),
        "signals": sorted({s for g in det.groups.values() for s in g.refs}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
