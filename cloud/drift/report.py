"""Drift events as analysts read them: id, scope, evidence, window range, severity, the
label-shift and expected-accuracy estimates, and a suggested action (docs/architecture.md §7)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import numpy as np

from slmops.cloud.drift.labelshift import confusion_matrix, em_priors, expected_accuracy
from slmops.cloud.drift.signals import SignalRef, mean_of_histogram
from slmops.cloud.drift.units import Group, UnitSig
from slmops.shared.messages import DriftEvent

__all__ = ["ACTIONS", "build_event", "mean_confidence"]

ACTIONS = {
    "class_prior": "class mix changed: check the estimated priors; a recalibrated version "
    "(logit bias + log(new/old prior)) can absorb a pure label shift",
    "confidence": "model confidence changed: review recent inputs; retrain if accuracy falls",
    "input_length": "inputs changed length: check what the apps send",
    "latency": "latency changed: check device load and the model variant assigned",
    "error_rate": "inference errors rose: check node logs and the installed model",
    "accuracy": "accuracy from app feedback fell: retrain on recent feedback",
}


def mean_confidence(g: Group, counts: list[float]) -> float | None:
    """Mean of a confidence histogram of ``g`` (None when its edges do not fit the counts)."""
    edges = g.edges.get("confidence")
    if edges is None or len(edges) != len(counts) + 1:
        return None
    return mean_of_histogram(counts, edges)


def estimates(
    g: Group, sigs: dict[str, UnitSig], signal: str, us: UnitSig
) -> tuple[dict[str, float] | None, float | None]:
    """The unit's estimated class priors (EM on its latest class counts with the reference
    confusion) and expected accuracy (from its latest mean confidence), when it has them."""
    priors = None
    prior_us = us if signal == "class_prior" else sigs.get("class_prior")
    if prior_us is not None and g.labels and len(g.labels) >= 2:
        # The latest tested window (for the fleet: the whole last round): the evidence run
        # may reach back before the shift and would mix old and new priors.
        counts = prior_us.last
        if len(counts) == len(g.labels) and sum(max(c, 0) for c in counts) > 0:
            if g.joint is not None:
                joint = np.asarray(g.joint)
            else:
                joint = confusion_matrix(g.labels, None, g.ref_accuracy)
            priors = {label: round(p, 4) for label, p in zip(g.labels, em_priors(counts, joint), strict=True)}
    acc = None
    conf_us = sigs.get("confidence")
    if conf_us is not None and conf_us.last:
        acc = expected_accuracy(mean_confidence(g, conf_us.last), g.ref_mean_conf, g.ref_accuracy)
    return priors, (round(acc, 4) if acc is not None else None)


def build_event(
    g: Group,
    node: str | None,
    signal: str,
    us: UnitSig,
    ref: SignalRef,
    state: str,
    effect: float,
    *,
    sigs: dict[str, UnitSig],
    now: datetime,
) -> DriftEvent:
    """The event of unit ``node`` (None: the fleet) for ``signal`` in ``state``; ``sigs`` are
    that unit's signals (for the estimates). Its id is deterministic (the publisher's
    ``Nats-Msg-Id``): fleet, scope, node, model, signal, episode, state (+ update number)."""
    scope: Literal["fleet", "node"] = "fleet" if node is None else "node"
    suffix = f".{us.updates}" if state == "updated" else ""
    m = g.model
    parts = (g.fleet, scope, node or "_", m.name, m.version, m.variant, signal, us.episode, state)
    event_id = ".".join(str(p) for p in parts) + suffix
    priors, acc = estimates(g, sigs, signal, us)
    run = us.run
    action = ACTIONS[signal] if state != "resolved" else "none: traffic matches the reference again"
    return DriftEvent(
        id=event_id,
        fleet=g.fleet,
        scope=scope,
        node=node,
        model=m,
        signal=signal,
        statistic="cusum_chi2_z",
        value=round(us.s, 4),
        p_value=us.pi,
        evidence=round(us.s, 4),
        effect_size=round(effect, 5),
        window_start=run.start if run is not None and run.start is not None else now,
        window_end=run.end if run is not None and run.end is not None else now,
        windows=run.windows if run is not None else 0,
        state=state,  # type: ignore[arg-type]
        severity=us.severity or "info",  # type: ignore[arg-type]
        reference=ref.source,
        estimated_priors=priors,
        expected_accuracy=acc,
        suggested_action=action,
        time=now,
    )
