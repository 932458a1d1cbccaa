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
    assert assignment_key("shops", "till-7", "minilm.emb") == "shops.till-7.minilm.emb"
    assert assignment_key("shops", None, "minilm.emb") == "shops._fleet.minilm.emb"
    with pytest.raises(ValueError, match="model name"):
        assignment_key("shops", "till-7", "bad name")
    assert model_object_name("clf", 3, "int8") == "clf/3/int8"
    assert msg_id("till-7", 42) == "till-7:42"
    assert msg_id("till-7", 42, "f1") == "f1/till-7:42"
    assert msg_id("till-7", 42, "f1", install="ab" * 16) == "f1/till-7/" + "ab" * 16 + ":42"
    with pytest.raises(ValueError, match="node"):
        telemetry_subject("shops", "till.7")


def test_the_shipped_example_configs_load_with_flag_names_as_keys() -> None:
    """deploy/edge.toml and deploy/cloud.toml load as they are, through the flag-named keys."""
    from slmops.cloud.config import CloudConfig
    from slmops.edge.config import EdgeConfig

    deploy = Path(__file__).parent.parent / "deploy"
    edge = EdgeConfig.build(None, deploy / "edge.toml")
    assert (edge.fleet, edge.node, edge.data_dir) == ("shops", "till-1", "/var/lib/slmops/edge")
    assert (edge.window, edge.outbox_max_bytes, edge.intra_op_threads) == (60.0, 16 * 1024**2, 1)
    assert edge.trust == ["/etc/slmops/keys/slmops.pub"]
    cloud = load_config(CloudConfig, None, deploy / "cloud.toml")
    assert (cloud.nats_url, cloud.state_dir, cloud.fleets) == (
        "nats://127.0.0.1:4222", "/var/lib/slmops/cloud", [])  # fmt: skip
    assert (cloud.lease_ttl, cloud.drift.min_count, cloud.rollout.stages) == (10.0, 100, [5, 25, 100])


def test_every_cloud_time_setting_takes_a_duration_string(tmp_path: Path) -> None:
    """The clock-skew and window-age bounds take "5m"/"30d" like every other time setting
    (they were plain seconds only, and --print-config showed 31536000.0)."""
    from slmops.cloud.config import CloudConfig

    path = tmp_path / "cloud.toml"
    path.write_text('max_clock_skew = "5m"\nmax_window_age = "30d"\n')
    cloud = load_config(CloudConfig, None, path)
    assert (cloud.max_clock_skew, cloud.max_window_age) == (300.0, 30 * 86400.0)


def test_old_config_keys_still_load_with_a_warning_naming_the_new_key(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from slmops.edge.config import EdgeConfig

    path = tmp_path / "edge.toml"
    path.write_text(
        'fleet = "f"\nnode = "n"\ndata_dir = "/d"\nnats_url = "nats://h:1"\noutbox-max = "1MiB"\n'
    )
    with capture_logs() as logs:
        cfg = EdgeConfig.build(None, path)
    assert (cfg.data_dir, cfg.nats_url, cfg.outbox_max_bytes) == ("/d", "nats://h:1", 1024**2)
    warned = {(e["event"], e["key"], e["use"]) for e in logs if e["log_level"] == "warning"}
    assert warned == {
        ("config_key_deprecated", "data_dir", "data"),
        ("config_key_deprecated", "nats_url", "nats"),
    }


def test_print_config_names_where_each_setting_came_from(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from slmops.cli import main

    path = tmp_path / "edge.toml"
    path.write_text('fleet = "f"\nnode = "n"\ndata = "/d"\nwindow = "10s"\n')
    result = CliRunner().invoke(
        main,
        ["edge", "--config", str(path), "--print-config", "--node", "n2"],
        env={"SLMOPS_EDGE_MIN_COUNT": "5"},
    )
    assert result.exit_code == 0, result.output
    lines = set(result.output.splitlines())
    assert f'fleet = "f"  # file {path}' in lines
    assert 'node = "n2"  # flag' in lines
    assert "min_count = 5  # env SLMOPS_EDGE_MIN_COUNT" in lines
    assert f'window = "10s"  # file {path}' in lines
    assert 'outbox_max = "16MiB"  # default' in lines
    cloud = CliRunner().invoke(main, ["cloud", "--print-config", "--state", str(tmp_path / "s")])
    assert cloud.exit_code == 0, cloud.output
    assert f'state = "{tmp_path / "s"}"  # flag' in cloud.output.splitlines()
    assert 'lease_ttl = "10s"  # default' in cloud.output.splitlines()
