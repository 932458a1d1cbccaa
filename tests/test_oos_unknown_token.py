"""The unknown-token share of tokenizer models (issue 14, out-of-scope input): a node counts
each inference whose tokens include the tokenizer's unknown token (``OOS_UNKNOWN_TOKEN`` in
``TelemetryAggregate.out_of_scope``, DP-noised like the other out-of-scope cells), the factory
measures the held-out share (the manifest's ``unknown_token_share``), and the cloud watches it
as the signal ``oos_unknown_token`` (manifest reference, CUSUM, BH, hysteresis)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from _transformer import make_transformer_bundle

from _edge_util import Keys, edge_config
from slmops.bench._fleet import MODEL, SyntheticFleet
from slmops.bench.fleetday import oos_manifest, oos_probs
from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector
from slmops.cloud.factory.cache import CachedModel
from slmops.cloud.factory.profile import out_of_scope_spec
from slmops.edge.node import EdgeNode
from slmops.edge.window import merge
from slmops.shared.messages import (
    OOS_CELLS,
    OOS_FOREIGN_SCRIPT,
    OOS_LOW_CONFIDENCE,
    OOS_UNKNOWN_TOKEN,
    OutOfScopeSpec,
    ReferenceProfile,
    TelemetryAggregate,
    decode_telemetry,
)
from slmops.shared.runtime import load_session

KNOWN = ["some words about alpha", "the beta", "hello world", "a long text"]
#: Words outside the test tokenizer's vocabulary: each text has at least one [UNK].
UNKNOWN = ["zebra crossing", "hello quokka", "Привет мир"]


def _spec(unknown_share: float | None) -> OutOfScopeSpec:
    return OutOfScopeSpec(
        threshold=0.0,  # no inference is "low confidence": only the other signs count here
        rate=0.0,
        scripts=["LATIN", "CYRILLIC"],
        low_confidence_share=0.0,
        foreign_script_share=0.0,
        unknown_token_share=unknown_share,
        count=1000,
    )


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def test_the_session_counts_unknown_tokens_per_text(tmp_path: Path, keys: Keys) -> None:
    bundle = make_transformer_bundle(tmp_path / "tf", keys.key)
    session = load_session(bundle)
    out = session.run([*KNOWN, *UNKNOWN])
    assert out.unknown is not None
    assert out.unknown[: len(KNOWN)] == [0] * len(KNOWN)
    assert all(u >= 1 for u in out.unknown[len(KNOWN) :])
    assert out.unknown[-1] == 2  # two unknown words, two [UNK] tokens


def _unknown_cells(agg: TelemetryAggregate) -> int:
    return sum(c for i, c in enumerate(agg.out_of_scope) if i & OOS_UNKNOWN_TOKEN)


async def _served_aggregate(
    tmp_path: Path, keys: Keys, fleet: str, spec: OutOfScopeSpec
) -> TelemetryAggregate:
    bundle = make_transformer_bundle(tmp_path / "tf", keys.key, out_of_scope=spec)
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=bundle.path, window=60.0)
    async with EdgeNode(cfg) as node:
        await node.predict([*KNOWN, *UNKNOWN])
        await node.predict(["zebra"])
        await node.windower.tick()
        aggs = [decode_telemetry(p) for _, p in await node.buffer.outbox_take(50)]
    assert aggs
    return functools.reduce(merge, aggs)


@pytest.mark.anyio
async def test_a_node_counts_inferences_with_unknown_tokens(tmp_path: Path, keys: Keys, fleet: str) -> None:
    """8 inferences, 4 with an unknown token (the Cyrillic one is in a listed script, so it
    shows only the unknown-token sign), no DP (the default): exact counts."""
    agg = await _served_aggregate(tmp_path, keys, fleet, _spec(0.0))
    assert agg.count == 8
    assert len(agg.out_of_scope) == OOS_CELLS
    assert sum(agg.out_of_scope) == 8
    assert _unknown_cells(agg) == 4
    assert agg.out_of_scope[OOS_UNKNOWN_TOKEN] == 4  # no other sign on those
    assert (
        sum(c for i, c in enumerate(agg.out_of_scope) if i & (OOS_LOW_CONFIDENCE | OOS_FOREIGN_SCRIPT)) == 0
    )


@pytest.mark.anyio
async def test_a_manifest_without_an_unknown_share_counts_no_unknown_tokens(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    agg = await _served_aggregate(tmp_path, keys, fleet, _spec(None))
    assert agg.count == 8
    assert _unknown_cells(agg) == 0


def test_the_factory_sets_the_held_out_unknown_share() -> None:
    from slmops.shared.histogram import Histogram
    from slmops.shared.messages import HeldOutScores

    profile = ReferenceProfile(
        count=4,
        class_counts={"a": 4},
        confidence=Histogram(edges=[0.0, 1.0001], counts=[4]),
        input_length=Histogram(edges=[0.0, 1e9], counts=[4]),
        held_out=HeldOutScores(true=[0, 0, 0, 0], probs=[[0.9, 0.1]] * 4, lengths=[3] * 4),
    )
    texts = ["a", "b", "c", "d"]
    assert out_of_scope_spec(profile, texts, texts, unknown=[0, 2, 0, 1]).unknown_token_share == 0.5
    assert out_of_scope_spec(profile, texts, texts).unknown_token_share is None


# -- the cloud's signal ---------------------------------------------------------------------

NODES = 3
_BASE_UNK = 0.02


def _oos(rng: np.random.Generator, n: int, unk: float) -> list[int]:
    rates = {OOS_LOW_CONFIDENCE: 0.05, OOS_UNKNOWN_TOKEN: unk}
    return [int(c) for c in rng.multinomial(n, oos_probs(rates))]


def _run(unknown_share: float | None, switch_at: int, windows: int) -> list[tuple[int, str, str, str]]:
    """3 nodes, 1-minute windows of 100..2000 inferences; from window ``switch_at`` on, 100% of
    traffic is a language the tokenizer does not know: 40% of inferences carry [UNK]."""
    fleet = SyntheticFleet("unk", NODES, 11)
    rng = np.random.default_rng(12)
    det = DriftDetector(DriftConfig(calibration_windows=50_000), clock=lambda: datetime.now(UTC))
    rates = {OOS_LOW_CONFIDENCE: 0.05, OOS_UNKNOWN_TOKEN: unknown_share or 0.0}
    det.add_group(fleet.fleet, MODEL, oos_manifest(rates, unknown=unknown_share is not None, count=20_000))
    out = []
    for w in range(1, windows + 1):
        for i in range(NODES):
            agg = fleet.aggregate(i, w)
            unk = 0.40 if w >= switch_at else _BASE_UNK
            agg.out_of_scope = _oos(rng, agg.count, unk)
            out += [(w, e.kind, e.signal, e.state) for e in det.observe(agg)]
    return out


def test_a_language_switch_opens_an_unknown_token_event_within_3_windows() -> None:
    """3 nodes, 100% of traffic switched at window 31 (after node baselines and the
    production baseline): a fleet ``oos_unknown_token`` drift event opens by window 33."""
    events = _run(_BASE_UNK, 31, 36)
    before = [e for e in events if e[1] == "drift" and e[0] < 31]
    assert before == [], before
    opened = [
        w
        for w, kind, signal, state in events
        if kind == "drift" and signal == "oos_unknown_token" and state == "opened"
    ]
    assert opened, events
    assert 31 <= opened[0] <= 33


def test_without_an_unknown_share_in_the_manifest_the_signal_is_not_watched() -> None:
    events = _run(None, 31, 36)
    assert not [e for e in events if e[2] == "oos_unknown_token"]


def test_the_minilm_default_counts_unknown_tokens(minilm_default: CachedModel) -> None:
    """The real MiniLM bundle: its manifest carries the held-out unknown-token share (the
    topic corpus is English: a small share), and its session counts [UNK] for scripts and
    symbols outside the WordPiece vocabulary (Ge'ez, Khmer, emoji) but not for English or
    Cyrillic (which the vocabulary has)."""
    from slmops.shared.bundle import read_bundle

    path = minilm_default.bundles["int8-l3"]
    spec = read_bundle(path).manifest.out_of_scope
    assert spec is not None
    assert spec.unknown_token_share is not None
    assert 0 <= spec.unknown_token_share < 0.05
    out = load_session(read_bundle(path)).run(
        ["the match ended in a draw", "Привет мир", "ሰላም ልዑል", "សួស្តី", "great game 🙂🚀"]
    )
    assert out.unknown is not None
    assert out.unknown[:2] == [0, 0]
    assert all(u > 0 for u in out.unknown[2:])
