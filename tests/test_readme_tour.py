"""The README's five-minute tour, driven as a script: its commands are read from README.md
(so the README cannot drift from what works) and run in order in a fresh directory, each in
bash as a user would paste it. Only what a second machine would change is changed: the NATS
port (`--port 4222` becomes a free port; the other commands find it through SLMOPS_NATS_URL)
and the node's API port (SLMOPS_EDGE_HTTP, SLMOPS_TRAFFIC_URL; curl's URL). The commands that
run until stopped (each its own terminal in the README) run in the background; the test waits
for what a user would see before going on (the server listening, the node serving), then for
the tour's rollout to complete, and checks the answers and that v2 is no worse than v1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _nats import free_port

README = Path(__file__).parent.parent / "README.md"
#: Commands that run until stopped (a terminal of their own in the tour).
SERVICES = ("slmops server", "slmops cloud", "slmops edge", "slmops drift watch")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def tour_commands(readme: str) -> list[str]:
    """The shell commands of the README's tour block, in order, continuation lines joined and
    comments dropped."""
    section = readme.split("## A five-minute tour", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands: list[str] = []
    pending = ""
    for raw in block.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    return commands


def test_the_tour_block_is_found_and_complete() -> None:
    commands = tour_commands(README.read_text())
    assert commands[0].startswith("slmops server")
    assert any(c.startswith("slmops rollout start") for c in commands)
    assert commands[-1].startswith("slmops rollout status")


class Tour:
    def __init__(self, root: Path, nats_port: int, http_port: int) -> None:
        self.root = root
        self.nats_port = nats_port
        self.http_port = http_port
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "SLMOPS_NATS_URL": f"nats://127.0.0.1:{nats_port}",
            "SLMOPS_EDGE_HTTP": f"127.0.0.1:{http_port}",
            "SLMOPS_TRAFFIC_URL": f"http://127.0.0.1:{http_port}",
        }
        self.services: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.outputs: dict[str, str] = {}

    def localize(self, command: str) -> str:
        return command.replace("--port 4222", f"--port {self.nats_port}").replace(
            "127.0.0.1:8470", f"127.0.0.1:{self.http_port}"
        )

    def run(self, command: str, timeout: float = 600) -> str:
        cmd = self.localize(command)
        if cmd.startswith(SERVICES):
            with (self.root / f"service-{len(self.services)}.log").open("wb") as log:
                proc = subprocess.Popen(["bash", "-c", cmd], cwd=self.root, env=self.env, stdout=log,
                                        stderr=log, start_new_session=True)  # fmt: skip
            self.services.append((cmd, proc))
            return ""
        done = subprocess.run(["bash", "-c", cmd], cwd=self.root, env=self.env, capture_output=True,
                              timeout=timeout, check=False)  # fmt: skip
        out = done.stdout.decode()
        assert done.returncode == 0, f"{cmd!r} exited {done.returncode}:\n{out}\n{done.stderr.decode()}"
        self.outputs[command] = out
        return out

    def wait(self, what: str, check: str, timeout: float) -> str:
        """Run ``check`` (a shell command) until it succeeds; what a user would wait for."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(["bash", "-c", check], cwd=self.root, env=self.env, capture_output=True,
                                  check=False)  # fmt: skip
            if done.returncode == 0:
                return done.stdout.decode()
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s\n{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.root.glob("service-*.log")))

    def stop(self) -> None:
        for _, proc in reversed(self.services):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.services):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    t = Tour(tmp_path, free_port(), free_port())
    try:
        yield t
    finally:
        t.stop()


def test_the_readme_tour_completes_as_written(tour: Tour) -> None:
    health = f"curl -sf http://127.0.0.1:{tour.http_port}/v1/health"
    for command in tour_commands(README.read_text()):
        tour.run(command)
        if command.startswith("slmops server"):
            tour.wait("the server listening", "slmops status --json", 60)
        elif command.startswith("slmops edge"):
            tour.wait("the node serving", f'{health} | grep -q \'"status": *"ok"\'', 180)
        elif command.startswith("slmops drift watch"):
            time.sleep(3)  # it replays, then follows until Ctrl-C
            cmd, proc = tour.services.pop()
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=30) == 0, cmd

    answers = [json.loads(out) for cmd, out in tour.outputs.items() if "/v1/predict" in cmd]
    assert [p["label"] for p in answers[0]["predictions"]] == ["sports", "coding"]
    fleet = json.loads(tour.run("slmops fleet status --json"))
    assert [(n["node"], n["online"]) for n in fleet["nodes"]] == [("till-1", True)]
    assert (
        "waiting" in tour.outputs["slmops rollout status"] or "gate" in tour.outputs["slmops rollout status"]
    )

    # The rollout completes on its own (one soak of 2 min once 200 predictions of v2 are in).
    deadline = time.monotonic() + 420
    while True:
        (state,) = json.loads(tour.run("slmops rollout status --json"))
        if state["status"] != "running":
            break
        assert time.monotonic() < deadline, f"rollout still running: {state['reason']}\n{tour.logs()}"
        time.sleep(2)
    assert state["status"] == "completed", (state["reason"], state["gates"])
    status = json.loads(tour.run("slmops status --json"))
    assigned = status["fleets"]["shops"]["assigned"]
    assert [(a["model"], a["version"], a["node"]) for a in assigned] == [("topics", 2, None)]

    # v2 is no worse than v1: each build measures its held-out accuracy on its own split (413
    # utterances), so two equally good models differ by sampling noise alone (one binomial
    # standard error is ~1.9 points at 0.81); v2 may be lower than v1 by at most two of them.
    acc = {}
    for version in (1, 2):
        doc = json.loads(tour.run(f"slmops models show --model topics --version {version} --json"))
        acc[version] = {v["variant"]: v["accuracy"] for v in doc["variants"]}
    for variant, v1 in acc[1].items():
        noise = 2 * (v1 * (1 - v1) / 413) ** 0.5
        assert acc[2][variant] >= v1 - noise, (variant, acc)
