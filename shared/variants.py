"""Which variant of a model version a device should run. Used by the cloud when it assigns a
node whose device profile it knows, and by a node itself when its assignment leaves the choice
to it (``Assignment.variant`` is None), so both decide the same way.

Rule: among the variants whose ``min_memory_mb`` fits the device's memory, the one needing the
most memory wins (the bigger variant is the more accurate one: fp32 over int8 over int8-l3); a
device that reports no memory (0) is assumed to fit everything.

The figures are measured, not guessed: the factory (``cloud.factory.minilm``) loads each
variant in a fresh process as a node does, runs one text and then one 32 × 64-token batch, and
records ``min_memory_mb`` = peak RSS × 1.5 rounded up to 16 MB. For the MiniLM default here
(RSS after load / peak): fp32 175 / 226 MB -> 352, int8 119 / 184 MB -> 288, int8-l3 106 /
171 MB -> 272; so a 300 MB device gets int8, a 280 MB one int8-l3. When nothing fits, the smallest variant is
chosen: the node will refuse it as ``too_large`` and report that, which an operator sees, rather
than silently running nothing new.
"""

from __future__ import annotations

from collections.abc import Mapping

from slmops.shared.messages import DeviceProfile

__all__ = ["PREFERENCE", "choose_variant"]

#: Tie-break between variants with the same memory need: earlier is preferred.
PREFERENCE = ("fp32", "fp16", "int8", "int8-l3")


def _rank(variant: str) -> int:
    return PREFERENCE.index(variant) if variant in PREFERENCE else len(PREFERENCE)


def choose_variant(min_memory_mb: Mapping[str, int], device: DeviceProfile) -> str:
    """Pick from ``{variant: min_memory_mb}`` for ``device`` (see the module docstring)."""
    if not min_memory_mb:
        raise ValueError("no variants to choose from")
    memory = device.memory_mb
    fits = [v for v, need in min_memory_mb.items() if memory <= 0 or need <= memory]
    if fits:
        return min(fits, key=lambda v: (-min_memory_mb[v], _rank(v), v))
    return min(min_memory_mb, key=lambda v: (min_memory_mb[v], _rank(v), v))
