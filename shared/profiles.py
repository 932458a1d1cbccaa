"""Device profiles: a class of devices a model variant is made and tested for
(``deploy/profiles/*.toml``: a shop till, a tablet, a gateway). The files live in the package,
``slmops/shared/device_profiles`` (``deploy/profiles`` links there), so an installed ``slmops``
finds them from any directory (``shipped_profiles_dir``).

A profile states what the device gives a model: the cores and inference threads, the memory and
disk the serving process may use, and a latency budget. The budget is **relative**: the p95 of
one text per call, as a multiple of the p95 that the unoptimised L6 fp32 model has on the same
host in the same run (``latency_factor``). An x86 test host says little about an ARM till's
milliseconds, but a variant 4× faster than L6 fp32 here is also much faster there; absolute
times are printed, never judged (docs/decisions/0008-relative-device-budgets.md).

Memory is judged by the serving process's peak resident set (``VmHWM``/``ru_maxrss``), not by
``RLIMIT_AS``: ONNX Runtime reserves address space it never touches, so an address-space cap
fails python + ORT for reasons unrelated to real memory use.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from slmops.shared.config import Config, load_config
from slmops.shared.errors import ConfigError

__all__ = ["ProfileSpec", "find_profile", "load_profile", "load_profiles", "shipped_profiles_dir"]


class ProfileSpec(Config, kw_only=True):
    """One device profile, as written in its TOML file (unknown keys are errors)."""

    #: Profile name, e.g. "till"; what nodes report and variants are named after.
    name: str
    #: CPU architecture of the real devices ("x86_64", "aarch64"): informative here.
    arch: str = "x86_64"
    #: Cores the inference process may run on (pinned with CPU affinity in ``models test``).
    cores: int
    #: ONNX Runtime intra-op threads.
    threads: int = 1
    #: The device's total memory (MB): what a node reports and variant choice compares with.
    memory_mb: int
    #: The serving process's peak RSS must stay within this (MB).
    model_memory_mb: int
    #: The bundle's bytes on disk must stay within this (MB).
    model_disk_mb: int
    #: The p95 latency budget (batch 1) as a multiple of L6 fp32's p95 on the same host, same run.
    latency_factor: float
    #: ONNX Runtime execution providers, in order; empty = CPU.
    providers: list[str] = []  # noqa: RUF012  (msgspec copies a default list per instance)

    def __post_init__(self) -> None:
        checks = (
            ("cores", self.cores >= 1, "at least 1"),
            ("threads", self.threads >= 1, "at least 1"),
            ("memory_mb", self.memory_mb >= 1, "at least 1"),
            ("model_memory_mb", 1 <= self.model_memory_mb <= self.memory_mb, "between 1 and memory_mb"),
            ("model_disk_mb", self.model_disk_mb >= 1, "at least 1"),
            ("latency_factor", self.latency_factor > 0, "greater than 0"),
            ("name", bool(self.name.strip()) and "/" not in self.name, "non-empty, without '/'"),
        )
        for key, ok, what in checks:
            if not ok:
                raise ValueError(f"`{key}` must be {what}, got {getattr(self, key)!r}")

    def host_cores(self) -> list[int]:
        """The CPUs this profile runs on here: its ``cores`` first ones this process may use
        (fewer when the host has fewer, which ``models test`` reports)."""
        if hasattr(os, "sched_getaffinity"):
            allowed = sorted(os.sched_getaffinity(0))
        else:
            allowed = list(range(os.cpu_count() or 1))
        return allowed[: self.cores]


def shipped_profiles_dir() -> Path:
    """The device profiles shipped in the package (package data of ``slmops.shared``; the
    repository's ``deploy/profiles`` is a link to the same folder)."""
    return Path(str(resources.files("slmops.shared") / "device_profiles"))


def load_profile(path: Path) -> ProfileSpec:
    """Read one profile file. Raises ``ConfigError`` naming the file and the bad key."""
    return load_config(ProfileSpec, path=Path(path))


def load_profiles(directory: Path) -> dict[str, ProfileSpec]:
    """Every ``*.toml`` in ``directory`` by profile name. Raises ``ConfigError`` for a bad file,
    a duplicate name, or a directory without profiles."""
    directory = Path(directory)
    files = sorted(directory.glob("*.toml")) if directory.is_dir() else []
    if not files:
        raise ConfigError(str(directory), "no device profiles (*.toml) here")
    found: dict[str, ProfileSpec] = {}
    for f in files:
        spec = load_profile(f)
        if spec.name in found:
            raise ConfigError(str(f), f"`name`: profile {spec.name!r} is defined twice")
        found[spec.name] = spec
    return found


def find_profile(ref: str, directory: Path) -> ProfileSpec:
    """``ref`` is a path to a profile file, or a profile name in ``directory``. Raises
    ``ConfigError`` that lists the names there when no such profile exists."""
    path = Path(ref)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise ConfigError(ref, "no such profile file")
        return load_profile(path)
    profiles = load_profiles(directory)
    if ref not in profiles:
        known = ", ".join(sorted(profiles))
        raise ConfigError(str(directory), f"no profile named {ref!r}; profiles here: {known}")
    return profiles[ref]
