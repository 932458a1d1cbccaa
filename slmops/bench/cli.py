"""``slmops bench cli``: how fast the command line answers ``--help`` (the top command and
each group) against ``python -c pass`` on the same interpreter, interleaved, median of N runs.
The goal (issue 15): ≤ 0.25 s here, where ``python -c pass`` takes ~0.04 s; what keeps it low
is that no heavy library is imported for ``--help`` (asserted by tests/test_cli_help.py)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["run"]

_COMMANDS = (
    ["--help"],
    ["demo", "--help"],
    ["cloud", "--help"],
    ["edge", "--help"],
    ["rollout", "status", "--help"],
)


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


async def run(quick: bool = False) -> list[dict[str, Any]]:
    import anyio

    return await anyio.to_thread.run_sync(lambda: _runs(3 if quick else 15))


def _runs(n: int) -> list[dict[str, Any]]:
    bare = [sys.executable, "-c", "pass"]
    results = []
    for args in _COMMANDS:
        ours, base = [], []
        for _ in range(n):  # interleaved: a burst of other work hits both alike
            ours.append(_time([sys.executable, "-m", "slmops.cli", *args]))
            base.append(_time(bare))
        o, b = statistics.median(ours), statistics.median(base)
        results.append(
            {
                "scenario": f"cli slmops {' '.join(args)}",
                "project": round(o, 4),
                "baseline": round(b, 4),
                "ratio": round(o / b, 2),
                "units": "s (median)",
                "goal_s": 0.25,
                "runs": n,
            }
        )
    return results
