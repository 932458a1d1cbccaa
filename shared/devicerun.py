"""One measurement of a bundle the way a device class would run it, in a process of its own:
``python -m slmops.shared.devicerun`` reads a JSON request on stdin and prints one JSON line.

It imports only ``slmops.shared`` (importing ``slmops.cloud`` would add tens of MB a node never
pays), pins itself to the given CPUs (``os.sched_setaffinity``) and loads sessions with the given
ONNX Runtime intra-op thread count. Two modes (``cloud.factory.lab`` runs both):

- ``latency``: loads the candidate and the reference (L6 fp32) and times them **interleaved,
  text by text** (candidate, reference, candidate, ...), so both see the same load on a shared
  machine; batch 1 on every text, then batch 32. Prints per-call milliseconds' p50/p95.
- ``memory``: loads the candidate alone, runs its smoke tests (``Session.smoke_test``), every
  text one by one, then one batch of 32, and prints the peak resident set (``VmHWM`` from
  ``/proc/self/status``; ``ru_maxrss`` elsewhere) and the smoke-test outcome.

- ``generation``: a generation bundle (``shared.generation``) alone: its smoke tests, then
  ``samples`` greedy answers (one held-out text each as the user message, at most
  ``max_new_tokens``), each timed: time to first token (template, encode, prefill, first token)
  and decode tokens/s ((tokens - 1) / (last token - first token)); prints their p50/p95, the
  decode rate over all answers, and the peak resident set.

Request: ``{"mode", "bundle", "reference" (latency), "cpus": [int], "threads": int,
"texts": [str], "samples": int, "max_new_tokens" (generation)}``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _quantiles(ms: list[float]) -> dict[str, float]:
    import numpy as np

    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def _session(path: str, threads: int) -> Any:
    from slmops.shared.bundle import read_bundle
    from slmops.shared.runtime import load_session

    return load_session(read_bundle(Path(path)), intra_op_threads=threads)


def _timed(session: Any, texts: list[str]) -> float:
    t0 = time.perf_counter()
    session.run(texts)
    return (time.perf_counter() - t0) * 1000.0


def _latency(req: dict[str, Any]) -> dict[str, Any]:
    threads = int(req["threads"])
    cand, ref = _session(req["bundle"], threads), _session(req["reference"], threads)
    texts: list[str] = req["texts"]
    n = int(req["samples"])
    for s in (cand, ref):  # warm-up: first calls allocate
        _timed(s, texts[:1])
        _timed(s, texts[:32])
    c1: list[float] = []
    r1: list[float] = []
    for i in range(n):
        text = [texts[i % len(texts)]]
        c1.append(_timed(cand, text))
        r1.append(_timed(ref, text))
    c32: list[float] = []
    r32: list[float] = []
    for i in range(max(3, n // 20)):
        start = (i * 32) % max(1, len(texts) - 32)
        batch = texts[start : start + 32]
        c32.append(_timed(cand, batch))
        r32.append(_timed(ref, batch))
    return {
        "candidate": {"batch1": _quantiles(c1), "batch32": _quantiles(c32)},
        "reference": {"batch1": _quantiles(r1), "batch32": _quantiles(r32)},
    }


def _loaded(load: Callable[[], Any]) -> tuple[Any, str]:
    """``load()`` and its smoke tests: (session, "" or the smoke failure), or (None, why it
    cannot load)."""
    from slmops.shared.errors import BundleError

    try:
        session = load()
    except BundleError as exc:
        return None, str(exc)
    try:
        session.smoke_test()
    except BundleError as exc:
        return session, str(exc)
    return session, ""


def _memory(req: dict[str, Any]) -> dict[str, Any]:
    session, smoke_error = _loaded(lambda: _session(req["bundle"], int(req["threads"])))
    if session is None:
        return {"smoke_ok": False, "smoke_error": smoke_error, "peak_mb": _peak_mb()}
    texts: list[str] = req["texts"]
    for text in texts[: int(req["samples"])]:
        session.run([text])
    session.run(texts[:32])
    return {"smoke_ok": not smoke_error, "smoke_error": smoke_error, "peak_mb": round(_peak_mb(), 1)}


def _generation(req: dict[str, Any]) -> dict[str, Any]:
    from slmops.shared.bundle import read_bundle
    from slmops.shared.generation import GenerationParams, load_generation

    bundle = read_bundle(Path(req["bundle"]))
    session, smoke_error = _loaded(
        lambda: load_generation(bundle.path, bundle.manifest, intra_op_threads=int(req["threads"]))
    )
    if session is None:
        return {"smoke_ok": False, "smoke_error": smoke_error, "peak_mb": _peak_mb()}
    texts: list[str] = req["texts"]
    params = GenerationParams(max_new_tokens=int(req["max_new_tokens"]))
    ttft: list[float] = []
    rates: list[float] = []
    tokens = 0
    decode_s = 0.0
    for i in range(int(req["samples"])):
        t0 = time.perf_counter()
        run = session.start(session.encode(texts[i % len(texts)], limit=1 << 30), params)
        run.prefill()
        first = end = 0.0
        n = 0
        while run.step() is not None:
            if len(run.tokens) > n:  # a token (not the end-of-sequence one) was generated
                n = len(run.tokens)
                end = time.perf_counter()
                first = first or end
        if not first:  # ended before any token: nothing to time
            continue
        ttft.append((first - t0) * 1000.0)
        if n > 1 and end > first:
            rates.append((n - 1) / (end - first))
            tokens += n - 1
            decode_s += end - first
    return {
        "smoke_ok": not smoke_error,
        "smoke_error": smoke_error,
        "peak_mb": round(_peak_mb(), 1),
        "answers": len(ttft),
        "ttft": _quantiles(ttft) if ttft else {"p50_ms": 0.0, "p95_ms": 0.0},
        "tokens_per_s_p50": float(sorted(rates)[len(rates) // 2]) if rates else 0.0,
        "tokens_per_s": tokens / decode_s if decode_s > 0 else 0.0,
        "output_tokens": tokens + len(ttft),
    }


def main() -> None:
    req = json.loads(sys.stdin.read())
    cpus = req.get("cpus") or []
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    modes = {"latency": _latency, "memory": _memory, "generation": _generation}
    out = modes[req["mode"]](req)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
