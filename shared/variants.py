"""Which variant of a model version a device should run. Used by the cloud when it assigns a
node whose device profile it knows, and by a node itself when its assignment leaves the choice
to it (``Assignment.variant`` is None), so both decide the same way.

Rule: a device that reports a profile (``DeviceProfile.profile``, issue 12) gets the variant
named after it — the one ``slmops models optimize`` made and measured for that class of
device — when it fits the device's memory. Otherwise, among the variants whose
``min_memory_mb`` fits the device's memory, the one needing the most memory wins (the bigger
variant is the more accurate one: fp32 over int8 over int8-l3); a device that reports no
memory (0) is assumed to fit everything. Where the cloud holds the variants' manifests it also
leaves out those whose measured figures break the profile's budgets (``device_fit``).

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

from slmops.shared.messages import DeviceProfile, ModelManifest

__all__ = ["PREFERENCE", "choose_fitting", "choose_variant", "device_fit"]

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
    if device.profile and device.profile in fits:
        return device.profile
    if fits:
        return min(fits, key=lambda v: (-min_memory_mb[v], _rank(v), v))
    return min(min_memory_mb, key=lambda v: (min_memory_mb[v], _rank(v), v))


def device_fit(manifest: ModelManifest, device: DeviceProfile) -> str | None:
    """Why the variant ``manifest`` does not fit ``device``'s profile by the figures measured
    for it (``manifest.optimization``, from ``slmops models optimize``'s device lab), or None
    when it fits or nothing measured says otherwise. Peak RSS is compared with the profile's
    ``model_memory_mb`` whichever profile it was measured under (a process's resident set
    hardly depends on its core count); the latency ratio (p95 over L6 fp32's, same host and
    run) only when it was measured under this very profile (cores and threads change it)."""
    o = manifest.optimization
    if o is None or not device.profile:
        return None
    where = f"variant {manifest.variant!r} (measured for profile {o.profile!r})"
    if device.model_memory_mb > 0 and o.peak_rss_mb > device.model_memory_mb:
        return (
            f"{where}: peak RSS {o.peak_rss_mb:g} MB over profile {device.profile!r}'s "
            f"{device.model_memory_mb} MB budget"
        )
    if o.profile == device.profile and device.latency_factor > 0 and o.latency_ratio > device.latency_factor:
        return (
            f"{where}: p95 {o.latency_ratio:g}x L6 fp32's over profile {device.profile!r}'s "
            f"{device.latency_factor:g}x budget"
        )
    return None


def choose_fitting(
    manifests: Mapping[str, ModelManifest], device: DeviceProfile
) -> tuple[str | None, dict[str, str]]:
    """The variant for ``device`` among ``manifests`` (by variant) that pass ``device_fit``,
    by ``choose_variant``; and why each other variant does not fit. (None, reasons) when
    none fits."""
    unfit = {v: why for v, m in manifests.items() if (why := device_fit(m, device)) is not None}
    fitting = {v: m.min_memory_mb for v, m in manifests.items() if v not in unfit}
    return (choose_variant(fitting, device) if fitting else None), unfit
