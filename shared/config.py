"""Configuration Structs. Unknown keys are errors (a typo must not become a silent default);
values come from a TOML/JSON file, ``SLMOPS_*`` environment variables or CLI flags.

A config type names its duration and size fields (``DURATIONS``, ``SIZES``); in a file or a
flag those take the human forms ``"500ms"``, ``"2m"``, ``"64k"``, ``"16MiB"`` as well as plain
seconds and bytes. Edge and cloud configs load the same way, through ``load_config``.

A config file's keys are the command's flag names: ``data``, ``nats``, ``outbox-max`` (or
``outbox_max``), where the field behind a flag is named otherwise (``FLAGS``); keys without a
flag are the field names (``[safety]``, ``max_in_flight``). The field names of earlier
releases (``data_dir``, ``nats_url``...) are still read, with a warning naming the new key.
``config_origins`` says where each effective value came from (default, file, env, flag)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec

from slmops.shared.errors import ConfigError

__all__ = [
    "Config",
    "config_origins",
    "file_key",
    "load_config",
    "parse_duration",
    "parse_size",
    "positive",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2, "g": 1000**3, "gi": 1024**3}


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``500ms``, ``2s``, ``1m``, ``1.5h``, ``2d`` or a bare number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"duration {value!r} is not valid: use e.g. 500ms, 2s, 1m, 1h, 2d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def positive(name: str, value: float) -> float:
    """``value`` when it is above 0; ``ValueError`` "``name`` must be positive, got ``value``"
    otherwise (NaN too). The one check behind every "must be positive" setting and argument."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def parse_size(value: str | int) -> int:
    """Bytes from ``4096``, ``64k``, ``10MB``, ``1GiB`` (k/M/G = 1000s, Ki/Mi/Gi = 1024s)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value!r}")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"size {value!r} is not valid: use e.g. 4096, 64k, 10MB, 1GiB")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every config Struct: unknown keys are rejected with the key's name."""

    #: Fields in seconds that also take "500ms", "2s", "1m" (parsed by ``load_config``).
    DURATIONS: ClassVar[tuple[str, ...]] = ()
    #: Fields in bytes that also take "64k", "10MB", "1GiB".
    SIZES: ClassVar[tuple[str, ...]] = ()
    #: Field -> the command-line flag that sets it, where the names differ; errors name both,
    #: and a config file writes the flag's name (``file_key``).
    FLAGS: ClassVar[dict[str, str]] = {}


C = TypeVar("C", bound=Config)


def file_key(type_: type[Config], field: str) -> str:
    """The key a config file writes for ``field``: its flag's name (``data_dir`` -> ``data``)."""
    flag = type_.FLAGS.get(field)
    return flag.removeprefix("--").replace("-", "_") if flag else field


def _read_file(type_: type[Config], path: Path, *, warn: bool = True) -> dict[str, Any]:
    """The file's table with its keys as field names (flag names and their dash or
    underscore spellings mapped; old field names accepted with a warning)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
        loaded = tomllib.loads(raw.decode()) if source.endswith(".toml") else msgspec.json.decode(raw)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.DecodeError) as exc:
        raise ConfigError(source, f"cannot read: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(source, "top level must be a table/object")
    by_key = {file_key(type_, f).replace("-", "_"): f for f in type_.__struct_fields__}
    out: dict[str, Any] = {}
    for key, value in loaded.items():
        norm = str(key).replace("-", "_")
        field = by_key.get(norm)
        if field is None and norm in type_.FLAGS:  # an old field name with a flag of its own
            field = norm
            if warn:
                import structlog  # here: `slmops --help` imports this module, not structlog

                structlog.get_logger(__name__).warning(
                    "config_key_deprecated", file=source, key=key, use=file_key(type_, norm),
                    note=f"`{key}` still works; write `{file_key(type_, norm)}` (the flag's name)",
                )  # fmt: skip
        out[field or key] = value
    return out


def load_config(type_: type[C], data: dict[str, Any] | None = None, path: Path | None = None) -> C:
    """Build ``type_`` from a TOML/JSON file overlaid with ``data`` (flags/env win).

    Raises ``ConfigError`` naming the source and the bad key or value."""
    merged: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        merged.update(_read_file(type_, path))
    merged.update({k: v for k, v in (data or {}).items() if v is not None})
    merged = {k: _plain(v) for k, v in merged.items()}
    for keys, parse in ((type_.DURATIONS, parse_duration), (type_.SIZES, parse_size)):
        for key in keys:
            if isinstance(merged.get(key), str):
                try:
                    merged[key] = parse(merged[key])
                except ValueError as exc:
                    raise ConfigError(source, f"{key}: {exc}") from exc
    try:
        return msgspec.convert(merged, type_, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        missing = re.match(r"Object missing required field `(\w+)`", message)
        if missing:
            field = missing.group(1)
            flag = type_.FLAGS.get(field, "--" + field.replace("_", "-"))
            message = f"{flag} is required (or `{file_key(type_, field)}` in a config file)"
        for field, flag in type_.FLAGS.items():
            message = message.replace(f"`{field}`", f"`{file_key(type_, field)}` ({flag})")
        raise ConfigError(source, message) from exc


def config_origins(
    type_: type[Config], data: dict[str, Any] | None, path: Path | None, given: dict[str, str] | None = None
) -> dict[str, str]:
    """Field -> where its effective value came from: ``given[field]`` (``"flag"`` or
    ``"env"``) for a non-None value in ``data`` (``"flag"`` when not named), ``"file <path>"``
    for a key of the file, else ``"default"``. Raises ``ConfigError`` as ``load_config``."""
    from_file = _read_file(type_, path, warn=False) if path is not None else {}
    out = {}
    for field in type_.__struct_fields__:
        if (data or {}).get(field) is not None:
            out[field] = (given or {}).get(field, "flag")
        elif field in from_file:
            out[field] = f"file {path}"
        else:
            out[field] = "default"
    return out


def _plain(value: Any) -> Any:
    """Paths (and lists of them) as strings, the form config Structs hold."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
