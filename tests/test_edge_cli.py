"""`slmops edge`: help, clear errors for bad flags and environment values, a bad --model
refused with its code; EdgeConfig validation; task supervision."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from _edge_util import Keys, edge_config
from _nats import wait_until
from slmops.cli import main
from slmops.edge.config import EdgeConfig
from slmops.edge.errors import DataDirInUse
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import MANIFEST_FILE
from slmops.shared.errors import ConfigError


def test_help_explains_the_command() -> None:
    result = CliRunner().invoke(main, ["edge", "--help"])
    assert result.exit_code == 0
    for words in ("--min-count", "k-anonymity", "SLMOPS_EDGE_", "--window", "--trust"):
        assert words in result.output


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--fleet", "bad.fleet"], {}, "fleet"),
        (["--node", "-x"], {}, "node"),
        (["--window", "5 parsecs"], {}, "window"),
        (["--http", "nohost"], {}, "http"),
        (["--min-count", "0"], {}, "'--min-count': must be >= 1"),  # the flag, not the field
        ([], {"SLMOPS_EDGE_FLEET": "from env!"}, "fleet"),
    ],
)
def test_bad_values_are_usage_errors_naming_them(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    base = {"--fleet": "f1", "--node": "n1", "--data": str(tmp_path / "d")}
    for flag in args[::2]:
        base.pop(flag, None)
    for key in env:
        base.pop("--" + key.removeprefix("SLMOPS_EDGE_").lower(), None)
    argv = ["edge", *[x for kv in base.items() for x in kv], *args]
    result = CliRunner().invoke(main, argv, env=env)
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_a_tampered_model_is_refused_with_its_code(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    bundle = keys.bundle()
    doc = json.loads((bundle.path / MANIFEST_FILE).read_text())
    doc["labels"] = ["x", "y", "z"]
    (bundle.path / MANIFEST_FILE).write_text(json.dumps(doc))
    argv = [
        "edge", "--fleet", "f1", "--node", "n1", "--data", str(tmp_path / "d"), "--nats", "nats://127.0.0.1:1",
        "--model", str(bundle.path), "--trust", str(keys.pub), "--http", "off",
    ]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert "bad_signature" in result.output


def test_config_accepts_human_durations_and_sizes_and_rejects_unknown_keys(tmp_path: Path) -> None:
    cfg = EdgeConfig.build(
        {"fleet": "f", "node": "n", "data_dir": tmp_path, "window": "500ms", "outbox_max_bytes": "64k"}
    )
    assert cfg.window == 0.5
    assert cfg.outbox_max_bytes == 64_000
    assert cfg.http_address == ("127.0.0.1", 8470)
    with pytest.raises(ConfigError, match="windw"):
        EdgeConfig.build({"fleet": "f", "node": "n", "data_dir": tmp_path, "windw": 1})
    with pytest.raises(ConfigError, match="dp_epsilon"):
        EdgeConfig.build({"fleet": "f", "node": "n", "data_dir": tmp_path, "dp_epsilon": -1})
    toml = tmp_path / "edge.toml"
    toml.write_text('fleet = "f"\nnode = "n"\nmin_count = 3\nwindow = "2m"\n')
    from_file = EdgeConfig.build({"data_dir": tmp_path, "node": "n2"}, toml)
    assert (from_file.min_count, from_file.window, from_file.node) == (3, 120.0, "n2")
    toml.write_text('fleet = "f"\nnode = "n"\nwindow = "soon"\n')
    with pytest.raises(ConfigError, match=r"edge\.toml.*window"):
        EdgeConfig.build({"data_dir": tmp_path}, toml)


@pytest.mark.anyio
async def test_a_crashing_task_is_restarted_then_stops_the_node(tmp_path: Path, fleet: str) -> None:
    """Supervision: a task that raises is logged and restarted with backoff; after 5 crashes
    within a minute the error propagates (the node stops instead of hanging)."""
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError(f"boom {calls}")

    async def broken() -> None:
        raise RuntimeError("always")

    async with EdgeNode(edge_config(tmp_path, Keys(tmp_path / "k"), fleet=fleet)) as node:
        with anyio.fail_after(10):
            await node._supervise("flaky", flaky)
        assert calls == 3
        assert node.last_error == "flaky: RuntimeError: boom 2"
        with anyio.fail_after(10), pytest.raises(RuntimeError, match="always"):
            await node._supervise("broken", broken)


@pytest.mark.anyio
async def test_a_network_task_that_keeps_crashing_never_stops_inference(tmp_path: Path, fleet: str) -> None:
    """A refused permission or a broken server can crash the refresh task again and again:
    it is restarted past the essential tasks' limit of 5 while the node keeps answering."""
    calls = 0

    async def refresh_refused() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("permissions violation for subscription")

    keys = Keys(tmp_path / "k")
    async with EdgeNode(edge_config(tmp_path, keys, fleet=fleet, model=keys.bundle().path)) as node:
        # Backoff 0.1+0.2+0.4+0.8+1.6 s: the 6th crash comes ~3.1 s in on a quiet machine; a
        # crash's logged traceback takes longer under load, so wait for it, not for a time.
        async with anyio.create_task_group() as tg:
            tg.start_soon(node._supervise, "refresh", refresh_refused)
            await wait_until(lambda: calls >= 6, 60, what="six crashes of the refresh task")
            tg.cancel_scope.cancel()
        assert node.last_error is not None
        assert "PermissionError" in node.last_error
        answers = await node.predict(["alpha"])
        assert len(answers) == 1


@pytest.mark.anyio
async def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path, fleet: str) -> None:
    """Two nodes on one data directory would reuse seqs: the second is refused, naming the
    holder; once the first stops, the directory is free again."""
    cfg = edge_config(tmp_path, Keys(tmp_path / "k"), fleet=fleet)
    async with EdgeNode(cfg):
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            async with EdgeNode(cfg):
                pass
    async with EdgeNode(cfg) as node:
        assert node.health()["status"] == "no_model"


def test_config_file_values_hold_unless_a_flag_is_given(tmp_path: Path) -> None:
    """--config sets values; click defaults do not override them, explicit flags do."""
    toml = tmp_path / "edge.toml"
    toml.write_text('fleet = "from_file"\nnode = "n"\nwindow = "2m"\nmin_count = 0\n')
    base = ["edge", "--config", str(toml), "--data", str(tmp_path / "d")]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2
    assert "min_count" in result.output  # the file's invalid 0 was used, not the default 10
    result = CliRunner().invoke(main, [*base, "--fleet", "x", "--node", "y", "--window", "nope"])
    assert result.exit_code == 2
    assert "window" in result.output


def test_a_taken_http_port_stops_the_command_at_once_naming_port_and_flag(tmp_path: Path) -> None:
    """`slmops edge` on a port another process listens on exits non-zero within seconds,
    naming the address and --http (it used to hang forever with its tasks running)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [
            sys.executable, "-m", "slmops.cli", "edge", "--fleet", "f1", "--node", "n1",
            "--data", str(tmp_path / "d"), "--nats", "nats://127.0.0.1:1", "--http", f"127.0.0.1:{port}",
        ]  # fmt: skip
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        took = time.monotonic() - t0
    assert done.returncode != 0, done.stderr
    assert took < 30, took
    assert f"127.0.0.1:{port} (--http)" in done.stderr, done.stderr
    assert "address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_data_directory_is_named_by_its_flag() -> None:
    """`slmops edge` without --data: the one-line usage error names --data, not only the
    config field `data_dir` (the new-user try read "missing required field `data_dir`")."""
    result = CliRunner().invoke(main, ["edge", "--fleet", "f", "--node", "n"])
    assert result.exit_code == 2, result.output
    assert "--data is required (or `data` in a config file)" in result.output
    assert "data_dir" not in result.output
    assert "Traceback" not in result.output


def test_every_missing_required_setting_is_named_by_its_flag() -> None:
    """`slmops edge` with nothing: the usage error names --fleet, then --node (the lead's try
    read "Object missing required field `fleet`"), as it does --data."""
    for given, flag in (([], "--fleet"), (["--fleet", "f"], "--node")):
        result = CliRunner().invoke(main, ["edge", *given])
        assert result.exit_code == 2, result.output
        assert f"{flag} is required (or `{flag[2:]}` in a config file)" in result.output
        assert "Object missing" not in result.output
