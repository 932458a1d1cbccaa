"""Drift on generation telemetry (issue 19): the real cloud service watches a generation
model's prompt likelihood and stop reasons like any other signal, with references from the
held-out prompts recorded in the manifest. A prompt-distribution shift from English chat to
Spanish chat at the SAME prompt-length distribution (each Spanish prompt drawn from the same
prompt-token bin as the English prompt it replaces) opens a drift event on the likelihood
or stop-reason signal, and none on input length.

Each inference's event row is what a node makes of one real generation of the tiny decoder
(``GenerationSession`` + ``edge.privacy.generation_row``, likelihood computed for every
prompt); windows are built by the node's own ``edge.window.build_aggregate`` from counts of
those rows and published as nodes publish them."""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import msgspec
import numpy as np
import pytest
from _cloud_util import T0, cloud_config, drift_events, publish, put_manifest
from _decoder import english_utterances, held_out_prompts, make_generation_bundle_for_tests, utterances
from nats.js import JetStreamContext

from _edge_util import Keys
from _nats import model_of, wait_until
from slmops.cloud.service import CloudService
from slmops.edge.privacy import EventRow, generation_row
from slmops.edge.window import ModelInfo, build_aggregate
from slmops.shared.generation import GenerationParams, GenerationSession
from slmops.shared.histogram import bin_index
from slmops.shared.messages import ModelManifest, TelemetryAggregate
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

NODES = 4
PER_WINDOW = 300
STATIONARY, SHIFTED = 10, 8


def _rows(session: GenerationSession, manifest: ModelManifest, prompts: list[str]) -> list[EventRow]:
    """One real generation per prompt, as the node's event row (model id 1)."""
    spec = manifest.generation
    assert spec is not None
    e = manifest.edges
    out = []
    for p in prompts:
        ids = session.encode(p)
        t0 = time.perf_counter()
        run = session.start(ids, GenerationParams(max_new_tokens=spec.max_new_tokens))
        ll = run.prefill(loglik=True)
        first = None
        while run.step() is not None:
            first = first or time.perf_counter()
        end = time.perf_counter()
        first = first or end
        n = len(run.tokens)
        out.append(
            generation_row(
                t=0.0,
                model_id=1,
                reason=manifest.labels.index(run.reason),
                loglik_bin=bin_index(e.confidence, math.exp(ll)) if ll is not None else -1,
                prompt_bin=bin_index(e.input_length, len(ids)),
                ttft_bin=bin_index(e.latency_ms, (first - t0) * 1000),
                output_bin=bin_index(spec.edges.output_tokens, n),
                tps_bin=bin_index(
                    spec.edges.tokens_per_s, (n - 1) / (end - first) if n > 1 and end > first else 0
                ),
                empty=not run.text.strip(),
                refusal=None,
            )
        )
    return out


def _window(info: ModelInfo, fleet: str, node: str, seq: int, rows: list[EventRow]) -> TelemetryAggregate:
    cells = Counter((r.label, r.conf_bin, r.len_bin, r.lat_bin, r.error, r.oos) for r in rows)
    agg = build_aggregate(
        fleet=fleet,
        node=node,
        info=info,
        seq=seq,
        start=0.0,
        end=0.0,
        cells=[(lb, cb, ln, lt, er, n, oos) for (lb, cb, ln, lt, er, oos), n in cells.items()],
        k=5,
        install="",
    )
    start = T0 + timedelta(minutes=seq)
    return msgspec.structs.replace(agg, window_start=start, window_end=start + timedelta(minutes=1))


async def test_a_language_shift_at_equal_prompt_lengths_opens_a_likelihood_or_stop_reason_event(
    tiny_decoder: Path,
    keys: Keys,
    tmp_path: Path,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
) -> None:
    bundle = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "b", keys.key, name=model_of(fleet))
    m = bundle.manifest
    session = GenerationSession(bundle.path, m)
    held = set(held_out_prompts())
    # ~200 real generations per language (a pool windows are drawn from): ~30 s at load 15 here.
    english = _rows(session, m, [t for t in english_utterances()[3::5] if t not in held][:200])
    spanish = _rows(session, m, utterances("spanish")[::4])
    by_len: dict[int, list[EventRow]] = {}
    for r in spanish:
        by_len.setdefault(r.len_bin, []).append(r)
    info = ModelInfo(
        model_id=1, ref=m.ref, labels=m.labels, edges=m.edges,
        generation=m.generation.edges if m.generation else None,
    )  # fmt: skip
    rng = np.random.default_rng(7)

    def sample(shifted: bool) -> list[EventRow]:
        rows = [english[i] for i in rng.integers(0, len(english), PER_WINDOW)]
        if not shifted:
            return rows
        out = []
        for r in rows:  # same prompt-token bin, other language
            near = min(by_len, key=lambda b: abs(b - r.len_bin))
            pool = by_len[near]
            out.append(pool[int(rng.integers(0, len(pool)))])
        return out

    await put_manifest(js, m)
    nodes = [f"{fleet}-g{i}" for i in range(NODES)]
    async with CloudService(cloud_config(nats_server.url, tmp_path / "cloud", fleet)) as svc:
        await svc.wait_active(20)
        for seq in range(1, STATIONARY + SHIFTED + 1):
            for node in nodes:
                await publish(js, _window(info, fleet, node, seq, sample(seq > STATIONARY)))
            if seq == STATIONARY:
                await wait_until(
                    lambda: (
                        sum(n.aggregates for (f, _), n in svc.nodes.items() if f == fleet)
                        == STATIONARY * NODES
                    ),
                    30,
                    what="stationary windows applied",
                )
                before = [e for e in await drift_events(js, fleet) if e.kind == "drift"]
                assert before == [], before
        total = (STATIONARY + SHIFTED) * NODES
        await wait_until(
            lambda: sum(n.aggregates for (f, _), n in svc.nodes.items() if f == fleet) == total,
            30,
            what="all windows applied",
        )
        await wait_until(lambda: svc.statistics().events_pending == 0, 10, what="events out")
    events = await drift_events(js, fleet)
    opened = [e for e in events if e.kind == "drift" and e.state == "opened"]
    signals = {e.signal for e in opened}
    assert signals & {"confidence", "class_prior"}, events
    assert "input_length" not in signals, opened
    first = min((e for e in opened if e.signal in ("confidence", "class_prior")), key=lambda e: e.window_end)
    assert first.window_end > T0 + timedelta(minutes=STATIONARY)  # after the shift, not before
    # Stop reasons are not classes: no label-shift estimate, nothing for the recalibration loop.
    assert all(e.estimated_priors is None for e in opened), opened
