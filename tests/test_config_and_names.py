"""Config rejects unknown keys; durations/sizes parse; ids are validated with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.shared.config import Config, load_config, parse_duration, parse_size
from slmops.shared.errors import ConfigError
from slmops.shared.names import assignment_key, model_object_name, msg_id, telemetry_subject, validate_id


class DemoConfig(Config, kw_only=True):
    fleet: str
    window: float = 60.0


def test_config_rejects_unknown_key_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('fleet = "f1"\nwindw = 5\n')
    with pytest.raises(ConfigError, match="windw") as info:
        load_config(DemoConfig, path=path)
    assert info.value.source == str(path)


def test_config_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.json"
    path.write_text('{"fleet": "f1", "window": 5}')
    cfg = load_config(DemoConfig, {"window": 7.5, "fleet": None}, path=path)
    assert (cfg.fleet, cfg.window) == ("f1", 7.5)


def test_config_wrong_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\$\.window"):
        load_config(DemoConfig, {"fleet": "f", "window": "soon"})


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1.5h", 5400.0), ("3", 3.0)]
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5 weeks", "-1s", "1m1s"])
def test_bad_durations_name_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [("4096", 4096), ("64k", 64000), ("10MB", 10**7), ("1GiB", 2**30)])
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["a.b", "x y", "", "_hidden", "ä", "n" * 65, "a>"])
def test_invalid_ids_are_rejected_with_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="not valid"):
        validate_id(bad, "node")


def test_subjects_and_keys_follow_the_contract() -> None:
    assert telemetry_subject("shops", "till-7") == "slmops.telemetry.shops.till-7"
    assert assignment_key("shops", "till-7") == "shops.till-7"
    assert assignment_key("shops") == "shops._fleet"
    assert model_object_name("clf", 3, "int8") == "clf/3/int8"
    assert msg_id("till-7", 42) == "till-7:42"
    assert msg_id("till-7", 42, "f1") == "f1/till-7:42"
    assert msg_id("till-7", 42, "f1", install="ab" * 16) == "f1/till-7/" + "ab" * 16 + ":42"
    with pytest.raises(ValueError, match="node"):
        telemetry_subject("shops", "till.7")
