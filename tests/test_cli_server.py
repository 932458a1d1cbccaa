"""`slmops server` serves JetStream to a plain nats-py client and stops cleanly on SIGTERM;
`slmops schema` prints JSON Schema for every wire message."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from _nats import free_port
from slmops.shared.messages import WIRE_TYPES
from slmops.shared.names import TELEMETRY_STREAM

SLMOPS = [sys.executable, "-m", "slmops.cli"]


@pytest.mark.anyio
async def test_server_command_answers_jetstream_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    errlog = tmp_path / "stderr.log"
    with (
        errlog.open("w") as err,
        subprocess.Popen(
            [*SLMOPS, "--log-json", "server", "--port", str(port), "--store", str(tmp_path / "js")],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        ) as proc,
    ):
        await _check_server(proc, port, tmp_path, errlog)


async def _check_server(proc: subprocess.Popen[str], port: int, tmp_path: Path, errlog: Path) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server printed its URL (or died)
        assert f"nats://127.0.0.1:{port}" in line, errlog.read_text()
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            js = nc.jetstream()
            info = await js.account_info()
            assert info.streams >= 1
            stream = await js.stream_info(TELEMETRY_STREAM)
            assert stream.config.subjects == ["slmops.telemetry.>"]
        finally:
            await nc.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert (tmp_path / "js").is_dir(), "a given store dir is kept"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_command_reports_a_port_in_use() -> None:
    port = free_port()
    with subprocess.Popen(
        [*SLMOPS, "server", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as first:
        _check_port_in_use(first, port)


def _check_port_in_use(first: subprocess.Popen[str], port: int) -> None:
    try:
        assert first.stdout is not None
        assert "ready" in first.stdout.readline()
        started = time.monotonic()
        second = subprocess.run(
            [*SLMOPS, "server", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert "nats-server did not start" in second.stderr
        assert time.monotonic() - started < 60
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=20)


def test_schema_command_prints_json_schema_of_every_message() -> None:
    out = subprocess.run([*SLMOPS, "schema"], capture_output=True, text=True, timeout=60, check=True)
    doc = json.loads(out.stdout)
    assert set(doc["messages"]) == {t.__name__ for t in WIRE_TYPES}
    assert doc["$defs"]["TelemetryAggregate"]["required"]


@pytest.mark.parametrize("port", ["-5", "65536"])
def test_server_refuses_a_port_out_of_range_as_a_usage_error(port: str) -> None:
    """A usage error like every other bad flag (exit 2, naming --port); it exited 1 with the
    server class's own message."""
    from click.testing import CliRunner

    from slmops.cli import main

    result = CliRunner().invoke(main, ["server", "--port", port])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--port'" in result.output
    assert f"{port} is not in the range -1<=x<=65535" in result.output
