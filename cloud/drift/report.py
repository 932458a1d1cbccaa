"""Drift events as analysts read them: id, scope, evidence, window range, severity, the
label-shift and expected-accuracy estimates, and a suggested action (docs/architecture.md §7)."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Literal

import numpy as np

from slmops.cloud.drift.labelshift import confusion_matrix, em_priors, expected_accuracy
from slmops.cloud.drift.signals import Acc, SignalRef, mean_of_histogram
from slmops.cloud.drift.units import Group, UnitSig
from slmops.shared.messages import DriftEvent
from slmops.shared.vocabulary import DriftKind, DriftReference, DriftSignal

__all__ = [
    "ACTIONS",
    "baseline_event",
    "build_event",
    "cell_names",
    "mean_confidence",
    "skew_event",
    "summary",
]

ACTIONS = {
    "class_prior": "class mix changed (generation models: the stop reasons): check the estimated priors; "
    "a recalibrated version (logit bias + log(new/old prior)) can absorb a pure label shift",
    "confidence": "model confidence changed (generation models: the prompts' likelihood under the model, "
    "i.e. new topics or languages): review recent inputs; retrain if accuracy falls",
    "input_length": "inputs changed length: check what the apps send",
    "latency": "latency changed: check device load and the model variant assigned",
    "error_rate": "inference errors rose: check node logs and the installed model",
    "accuracy": "accuracy from app feedback fell: retrain on recent feedback",
    "oos_low_confidence": "more inputs the model is unsure of: look for new topics or languages; "
    "retrain with them",
    "oos_unknown_token": "more inputs with unknown tokens: a new language or vocabulary; retrain or route",
    "oos_foreign_script": "more text outside the training script(s): a new language; retrain or route",
    "output_tokens": "answers changed length: check the prompts and the stop settings",
    "empty_output": "more empty answers: check the prompts, stop strings and the model",
    "refusal": "more answers in a declared refusal category: look for new topics the model declines",
}
_TWO_CELL = {
    "error_rate": ("errors", "successes"),
    "accuracy": ("wrong", "right"),
    "oos_low_confidence": ("out of scope", "in scope"),
    "oos_unknown_token": ("texts with an unknown token", "texts without"),
    "oos_foreign_script": ("foreign-script characters", "training-script characters"),
    "empty_output": ("empty answers", "answers with text"),
    "refusal": ("refusals", "other answers"),
}
_NAMES = {
    "class_prior": "class mix",
    "confidence": "confidence",
    "input_length": "input length",
    "latency": "latency",
    "error_rate": "error rate",
    "accuracy": "feedback accuracy",
    "oos_low_confidence": "low-confidence share",
    "oos_unknown_token": "unknown-token share",
    "oos_foreign_script": "foreign-script share",
    "output_tokens": "answer length",
    "empty_output": "empty-answer share",
    "refusal": "refusal share",
}


def cell_names(g: Group, signal: str, cells: int) -> list[str]:
    """What each count cell of ``signal`` is, for people (labels, bin ranges)."""
    if signal == DriftSignal.CLASS_PRIOR and len(g.labels) == cells:
        return list(g.labels)
    if signal in _TWO_CELL and cells == 2:
        return list(_TWO_CELL[signal])
    edges = g.edges.get(signal)
    if edges is not None and len(edges) == cells + 1:
        return [f"{a:g}–{b:g}" if b < 1e8 else f"≥{a:g}" for a, b in itertools.pairwise(edges)]
    return [str(i) for i in range(cells)]


def _period(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    fmt = "%H:%M" if (end - start).total_seconds() >= 120 else "%H:%M:%S"
    day = "" if start.date() == end.date() else f"{start:%Y-%m-%d} "
    return f"{day}{start:{fmt}}–{end:{fmt}}"


def summary(g: Group, signal: str, counts: list[float], ref: SignalRef) -> str:
    """One line: where the distribution moved (the largest rises in points) against what."""
    name = _NAMES.get(signal, signal)
    total = sum(max(c, 0) for c in counts)
    if total <= 0 or len(counts) != len(ref.probs):
        return f"{name}: no counts"
    names = cell_names(g, signal, len(counts))
    diffs = sorted(
        ((100 * (max(c, 0) / total - p), n) for c, p, n in zip(counts, ref.probs, names, strict=True)),
        reverse=True,
    )
    if signal in _TWO_CELL:
        share, base = 100 * max(counts[0], 0) / total, 100 * ref.probs[0]
        what = f"{name} {share:.1f}% (reference {base:.1f}%)"
    else:
        ups = [f"{n} ({d:+.0f} pts)" for d, n in diffs[:2] if d >= 1] or [
            f"{diffs[0][1]} ({diffs[0][0]:+.1f} pts)"
        ]
        what = f"{name} moved toward " + " and ".join(ups)
    if ref.source == "manifest":
        return f"{what} against the manifest's reference"
    if ref.source.startswith("baseline:"):
        period = _period(ref.start, ref.end)
        return f"{what} since the {ref.source}" + (f" of {period}" if period else "")
    return f"{what} against the {ref.source.replace('_', ' ')}"


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
    prior_us = us if signal == DriftSignal.CLASS_PRIOR else sigs.get("class_prior")
    # A generation model's "classes" are stop reasons: no label shift to estimate, and so
    # nothing for the recalibration loop (its groups alone have output-token edges).
    generation = DriftSignal.OUTPUT_TOKENS in g.edges
    if prior_us is not None and g.labels and len(g.labels) >= 2 and not generation:
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
    action = ACTIONS.get(signal, "") if state != "resolved" else "none: traffic matches the reference again"
    text = summary(g, signal, us.last, ref) if us.last else ""
    if state == "resolved":
        text = f"{_NAMES.get(signal, signal)} back to the reference ({ref.source})"
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
        summary=text,
        reference_start=ref.start,
        reference_end=ref.end,
    )


def _priors(g: Group, counts: list[float]) -> dict[str, float] | None:
    if not g.labels or len(g.labels) < 2 or len(counts) != len(g.labels):
        return None
    if sum(max(c, 0) for c in counts) <= 0:
        return None
    joint = np.asarray(g.joint) if g.joint is not None else confusion_matrix(g.labels, None, g.ref_accuracy)
    return {label: round(p, 4) for label, p in zip(g.labels, em_priors(counts, joint), strict=True)}


def skew_event(
    g: Group, differences: dict[str, float], pooled: dict[str, Acc], severity: str, now: datetime
) -> DriftEvent:
    """The one ``skew`` event of a group: its first (baseline) rounds against the manifest.
    ``differences`` is signal -> effect; the event's ``signal`` is the largest one."""
    m = g.model
    top = max(differences, key=lambda k: differences[k])
    acc = pooled[top]
    parts = []
    for signal in sorted(differences, key=lambda k: -differences[k]):
        ref = g.manifest_refs[signal]
        parts.append(f"{summary(g, signal, pooled[signal].counts, ref).split(' against ')[0]} "
                     f"(TV {differences[signal]:.2f})")  # fmt: skip
    prior_acc = pooled.get("class_prior")
    return DriftEvent(
        id=".".join(str(p) for p in (g.fleet, "fleet", "_", m.name, m.version, m.variant, DriftKind.SKEW)),
        fleet=g.fleet,
        scope="fleet",
        model=m,
        signal=top,
        statistic="skew_tv",
        value=differences[top],
        effect_size=differences[top],
        window_start=acc.start or now,
        window_end=acc.end or now,
        windows=acc.windows,
        state="opened",
        severity=severity,  # type: ignore[arg-type]
        reference=DriftReference.MANIFEST,
        estimated_priors=_priors(g, prior_acc.counts) if prior_acc is not None else None,
        suggested_action="training-serving skew, not a change: the fleet's traffic differed from the "
        "held-out reference from the start; drift is watched against the production baseline",
        time=now,
        kind=DriftKind.SKEW,
        summary="skew against the manifest: " + "; ".join(parts),
        differences=differences,
    )


def baseline_event(
    g: Group, name: str, pooled: dict[str, Acc], start: datetime | None, end: datetime | None, now: datetime
) -> DriftEvent:
    """A ``baseline`` event: ``name`` (``baseline:<id>``) was accepted for the group."""
    m = g.model
    windows = max((a.windows for a in pooled.values()), default=0)
    n = max((a.n for a in pooled.values()), default=0.0)
    period = _period(start, end)
    return DriftEvent(
        id=".".join(
            str(p)
            for p in (g.fleet, "fleet", "_", m.name, m.version, m.variant, DriftKind.BASELINE, name[9:])
        ),
        fleet=g.fleet,
        scope="fleet",
        model=m,
        signal=DriftKind.BASELINE,  # about no single signal
        statistic="pooled_inferences",
        value=float(n),
        effect_size=0.0,
        window_start=start or now,
        window_end=end or now,
        windows=windows,
        state="opened",
        severity="info",
        reference=name,
        suggested_action="none: drift is now watched against this baseline",
        time=now,
        kind=DriftKind.BASELINE,
        summary=f"{name} accepted: {int(n)} inferences in {windows} node windows"
        + (f", {period}" if period else "")
        + f" ({', '.join(sorted(pooled))})",
        reference_start=start,
        reference_end=end,
    )
