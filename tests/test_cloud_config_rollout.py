"""The cloud config's [rollout] table: unknown keys are errors, while the rollout state stored
in KV still reads fields a newer controller added."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from slmops.cloud.config import CloudConfig, RolloutConfig
from slmops.shared.config import load_config
from slmops.shared.errors import ConfigError


def test_rollout_table_typo_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text("[rollout]\nstages = [40, 100]\nsoak = 4.0\n")
    with pytest.raises(ConfigError, match="soak"):
        load_config(CloudConfig, path=path)


def test_rollout_table_sets_the_auto_rollout_config(tmp_path: Path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text("[rollout]\nstages = [40, 100]\nsoak_s = 4.0\nmin_samples = 100\n")
    rollout = load_config(CloudConfig, path=path).rollout.config()
    assert type(rollout) is RolloutConfig
    assert (rollout.stages, rollout.soak_s, rollout.min_samples) == ([40, 100], 4.0, 100)


def test_stored_rollout_config_tolerates_a_newer_field() -> None:
    stored = msgspec.json.encode({"stages": [5, 100], "soak_s": 1.0, "added_later": True})
    assert msgspec.json.decode(stored, type=RolloutConfig).stages == [5, 100]
