"""``slmops bench``: each scenario measures the project's path and the bare-library baseline
in the same run and reports both with their ratio. Nothing here passes or fails on a time.

A scenario is a module ``slmops.bench.<name>`` with ``async def run(quick: bool = False) ->
list[dict[str, object]]``; each result holds ``scenario``, ``project``, ``baseline``, ``ratio``
and ``units`` plus any detail keys.
"""

from __future__ import annotations

import importlib
import platform
from typing import Any

SCENARIOS = ("edge", "buffer", "ingest", "drift", "refresh", "recalibration", "fuzz", "cli")
#: Scenarios run only when named (not by ``all``): they take many minutes.
LONG_SCENARIOS = ("demo", "optimize", "generate")
REQUIRED_KEYS = ("scenario", "project", "baseline", "ratio", "units")

__all__ = ["LONG_SCENARIOS", "REQUIRED_KEYS", "SCENARIOS", "machine", "run_scenario"]


async def run_scenario(name: str, *, quick: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Run one scenario (``options`` go to its ``run``: ``model`` for edge and generate; runs, load, nodes
    for demo) and check each result has the required keys."""
    if name not in SCENARIOS + LONG_SCENARIOS:
        raise ValueError(
            f"unknown bench scenario {name!r}; choose from {', '.join(SCENARIOS + LONG_SCENARIOS)}"
        )
    module = importlib.import_module(f"slmops.bench.{name}")
    results: list[dict[str, Any]] = await module.run(quick=quick, **options)
    for r in results:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise RuntimeError(f"bench {name} returned a result without {missing}: {r!r}")
    return results


def machine() -> dict[str, Any]:
    """What the figures were measured on (printed beside them)."""
    import os

    import onnxruntime

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpus": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
    }
