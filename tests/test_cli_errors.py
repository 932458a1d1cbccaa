"""Start-up and usage errors of the commands, as a new user meets them (issue 13, fault 10):
one line and exit 2 for a bad flag, a plain reason for a taken port, a warning when the
server cannot be reached, and no nats-server left behind by a killed `slmops server`.
Every command runs as a real process with default settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _edge_util import Keys
from _nats import free_port

SLMOPS = [sys.executable, "-m", "slmops.cli"]

BAD_URLS = [
    ("nats://host:abc", "no valid port"),
    ("http://127.0.0.1:8222", "HTTP URL"),
    ("nats://:4222", "not a NATS URL"),
    ("nats://h:4222/path", "path"),
]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLMOPS, *args], capture_output=True, text=True, timeout=timeout, check=False)


def _one_line_usage_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, done.stderr
    for word in words:
        assert word in error_lines[0], done.stderr


@pytest.mark.parametrize(("url", "reason"), BAD_URLS, ids=[u for u, _ in BAD_URLS])
@pytest.mark.parametrize(
    "command", [["cloud"], ["fleet", "status"], ["rollout", "status"], ["models", "list"]]
)
def test_a_malformed_nats_url_is_one_line_and_exit_2(command: list[str], url: str, reason: str) -> None:
    """Each networked command refuses a URL it cannot use before connecting: the flag and the
    reason in one line (it used to be a 40-line traceback, or a DNS error for http://)."""
    _one_line_usage_error(_run(*command, "--nats", url), "--nats", reason)


def test_edge_refuses_a_malformed_url_and_a_private_key_as_trust(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    base = ["edge", "--fleet", "f1", "--node", "n1", "--data", str(tmp_path / "d"), "--http", "off"]
    _one_line_usage_error(_run(*base, "--nats", "nats://host:abc"), "--nats", "no valid port")
    private = tmp_path / "keys" / "signing.key"
    private.write_bytes(_private_pem(keys))
    done = _run(*base, "--nats", "nats://127.0.0.1:1", "--trust", str(private))
    _one_line_usage_error(done, "--trust", "private key", ".pub")


def _private_pem(keys: Keys) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return keys.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_cloud_warns_at_the_default_log_level_when_nats_is_unreachable(tmp_path: Path) -> None:
    """Nothing listens on the port: after the first failed attempts a warning names the URL
    (info lines alone were all there was), and the service keeps retrying."""
    port = free_port()
    warning = None
    with subprocess.Popen(
        [
            *SLMOPS,
            "--log-json",
            "cloud",
            "--nats",
            f"nats://127.0.0.1:{port}",
            "--state",
            str(tmp_path / "s"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + 60
            while warning is None and time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line:
                    break
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("level") == "warning" and record.get("event") == "nats_unreachable":
                        warning = record
            assert proc.poll() is None, "the service keeps running while NATS is away"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert warning is not None
    assert warning["url"] == f"nats://127.0.0.1:{port}"
    assert warning["failures"] >= 3


def test_server_on_a_taken_port_says_so_plainly_before_touching_the_store(tmp_path: Path) -> None:
    """`slmops server` on a port something listens on: one line with the address, --port and
    "address already in use", exit 1, no server banner, and the store directory not made."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = tmp_path / "js"
        done = _run("server", "--port", str(port), "--store", str(store))
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port} (--port): address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not store.exists()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_killed_server_command_takes_its_nats_server_with_it(tmp_path: Path) -> None:
    """SIGKILL of `slmops server` (no chance to clean up): its nats-server child goes too."""
    port = free_port()
    with subprocess.Popen(
        [*SLMOPS, "server", "--port", str(port), "--store", str(tmp_path / "js")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert "ready" in proc.stdout.readline()
        (child,) = _children(proc.pid)
        assert _alive(child)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    outlived = _alive(child)
    if outlived:  # do not leave it running for the rest of the suite
        os.kill(child, signal.SIGKILL)
    assert not outlived, f"nats-server pid {child} outlived its parent"


def test_a_task_group_failure_is_named_by_its_causes() -> None:
    """What `slmops bench` prints for a failed scenario (and the one-error unwrapping of the
    exit-code runner): a real anyio task group's ``ExceptionGroup`` is named by each error in
    it. Old code printed only "ExceptionGroup: unhandled errors in a TaskGroup (2
    sub-exceptions)"."""
    import anyio
    import anyio.lowlevel

    from slmops.cli_common import describe, leaf_errors

    async def fail(exc: Exception) -> None:
        with anyio.CancelScope(shield=True):  # raised even when the other failure came first
            await anyio.lowlevel.checkpoint()
        raise exc

    async def main() -> None:
        async with anyio.create_task_group() as outer:
            outer.start_soon(fail, ConnectionResetError("the node's socket went away"))
            async with anyio.create_task_group() as inner:
                inner.start_soon(fail, KeyError("texts"))

    with pytest.raises(BaseExceptionGroup) as caught:
        anyio.run(main)
    text = describe(caught.value)
    assert "ConnectionResetError: the node's socket went away" in text
    assert "KeyError: 'texts'" in text
    assert "unhandled errors" not in text
    assert [type(e) for e in leaf_errors(ValueError("x"))] == [ValueError]


def test_ctrl_c_aborts_a_one_shot_command_plainly() -> None:
    """Ctrl-C while `slmops fleet status` waits for NATS (a socket that accepts and never
    answers): "Aborted!" and exit 1. Old code: the runner returned None for it and the
    command failed on ``assert result is not None`` with a traceback. The command's own
    connect timeout (about 2-3 s after the connect, measured) races the signal: on a loaded
    machine it may give up first and say so in one line, also without a traceback."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        args = [*SLMOPS, "fleet", "status", "--nats", url]
        with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            conn, _ = silent.accept()  # the command now waits for the server's INFO
            with conn:
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err
    if "Aborted!" in err:
        assert proc.returncode == 1, err
    else:  # the connect timed out before the interrupt was handled
        assert err.startswith("Error: NATS at "), err


_START = ["rollout", "start", "--fleet", "f", "--version", "2"]
_EDGE = ["edge", "--fleet", "f", "--node", "n", "--nats", "nats://127.0.0.1:1"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([*_START, "--min-quality", "150%"], "Invalid value for '--min-quality'"),
        ([*_START, "--stages", "50,10"], "Invalid value for '--stages'"),
        ([*_START, "--soak", "-1s"], "Invalid value for '--soak'"),
        ([*_START, "--max-failures", "200%"], "Invalid value for '--max-failures'"),
        ([*_EDGE, "--data", "DATA", "--threads", "-2"], "for '--threads': must be >= 1, got -2"),
        ([*_EDGE, "--data", "DATA", "--outbox-max", "-1"], "for '--outbox-max': size '-1' is not valid"),
        ([*_EDGE, "--data", "/proc/nope"], "--data: cannot create the data directory /proc/nope"),
    ],
)
def test_a_bad_value_names_the_option_typed(args: list[str], said: str, tmp_path: Path) -> None:
    """In-process: each is refused before any connection, naming the flag the user typed
    (click's "Invalid value for '--x'"), not a config field or a bare errno."""
    from click.testing import CliRunner

    from slmops.cli import main

    args = [str(tmp_path / "data") if a == "DATA" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert "intra_op_threads" not in result.output
    assert "outbox_max_bytes" not in result.output
    assert not (tmp_path / "data").exists()
