"""Resident memory of a process serving a bundle, measured in a fresh subprocess so the figure
is what a node pays, not what the factory process happens to hold.

The subprocess (``_SCRIPT``, run with ``python -c``: importing ``slmops.cloud`` would add
~60 MB a node never pays) imports only ``slmops.shared``, loads the bundle with the runtime (ONNX
Runtime with one intra-op thread, as a node), runs one text, then one batch of 32 texts of
``max_tokens`` tokens, and prints JSON ``{"load_mb", "peak_mb"}``: VmRSS after load and the
first call, and VmHWM (peak RSS) after the big batch, from ``/proc/self/status`` (Linux; else
``resource.getrusage`` for both).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MB_HELPER", "MemoryFigures", "measure_rss"]


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    load_mb: float
    peak_mb: float


#: The head of every measuring script: ``mb(field)`` reads MB from ``/proc/self/status``.
MB_HELPER = """
import json, resource, sys
from pathlib import Path

def mb(field):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
"""

_SCRIPT = (
    MB_HELPER
    + """
from slmops.shared.bundle import read_bundle
from slmops.shared.runtime import load_session

bundle = read_bundle(Path(sys.argv[1]))
session = load_session(bundle)
session.run(["hello there"])
load = mb("VmRSS")
session.run([" ".join(["word"] * bundle.manifest.preprocessing.max_tokens * 2)] * 32)
print(json.dumps({"load_mb": round(load, 1), "peak_mb": round(mb("VmHWM"), 1)}))
"""
)


def measure_rss(
    bundle_dirs: Sequence[Path],
    *,
    timeout: float = 180.0,
    script: str = _SCRIPT,
    args: Sequence[str] = (),
) -> list[MemoryFigures]:
    """Run ``script`` (default: the one above) on each of ``bundle_dirs`` (its ``argv[1]``;
    ``args`` follow), in concurrent subprocesses (RSS is per process, so they do not disturb
    each other's figures); the script prints JSON ``{"load_mb", "peak_mb"}`` last. Raises
    ``RuntimeError`` with the failing one's last stderr line."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(d), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in bundle_dirs
    ]
    results: list[MemoryFigures] = []
    try:
        for d, proc in zip(bundle_dirs, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                lines = err.strip().splitlines()
                raise RuntimeError(f"measuring RSS of {d} failed: {lines[-1] if lines else proc.returncode}")
            doc = json.loads(out.strip().splitlines()[-1])
            results.append(MemoryFigures(load_mb=float(doc["load_mb"]), peak_mb=float(doc["peak_mb"])))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
