"""`slmops --help` and every subcommand's `--help` import none of the heavy libraries (numpy,
onnxruntime, scipy, aiohttp — nats-py pulls in aiohttp): they are imported by the commands
that need them, when they run. The mechanism is asserted, not a time (`slmops bench cli`
measures the time against `python -c pass`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import click
import pytest

from slmops.cli import main

#: structlog (with rich, which it imports when installed) is the logging set-up, which a --help
#: does not need (about 100 ms of the 0.25 s goal).
HEAVY = ("numpy", "onnxruntime", "scipy", "aiohttp", "nats", "structlog", "rich")


def _commands(cmd: click.Command, path: list[str]) -> Iterator[list[str]]:
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, [*path, name])


def test_help_of_every_command_imports_no_heavy_library() -> None:
    paths = list(_commands(main, []))
    assert len(paths) > 20  # the whole tree, not just the top
    # One interpreter walks every --help (one process per command would take a minute here).
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from slmops.cli import main\n"
        f"for path in {paths!r}:\n"
        "    r = CliRunner().invoke(main, [*path, '--help'])\n"
        "    assert r.exit_code == 0, (path, r.output)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_log_options_are_accepted_after_the_subcommand_too() -> None:
    from click.testing import CliRunner

    from slmops.cli import hoist_global_options

    assert hoist_global_options(["fleet", "status", "--log-level", "debug", "--json"]) == [
        "--log-level", "debug", "fleet", "status", "--json"]  # fmt: skip
    assert hoist_global_options(["schema", "--log-level=error", "--log-console"]) == [
        "--log-level=error", "--log-console", "schema"]  # fmt: skip
    assert hoist_global_options(["edge", "--", "--log-level"]) == ["edge", "--", "--log-level"]
    ok = CliRunner().invoke(main, ["schema", "--log-level", "warning"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, ["schema", "--log-level", "loud"])
    assert bad.exit_code == 2  # a usage error
    assert "'loud' is not one of" in bad.output


def test_the_readme_command_table_names_every_command_and_documents_completion() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `slmops ")]
    for path in _commands(main, []):
        if not path or isinstance(_lookup(path), click.Group):
            continue
        head, *sub = path
        assert any(f"`slmops {head}" in row and all(s in row for s in sub) for row in rows), path
    assert "_SLMOPS_COMPLETE=bash_source slmops" in readme
    slmops = str(Path(sys.executable).parent / "slmops")  # the installed entry point
    script = subprocess.run([slmops], env={**os.environ, "_SLMOPS_COMPLETE": "bash_source"},
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert script.returncode == 0
    assert "_SLMOPS_COMPLETE=bash_complete" in script.stdout


def _lookup(path: list[str]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def test_bench_cli_times_help_against_a_bare_interpreter() -> None:
    from slmops.bench import REQUIRED_KEYS
    from slmops.bench.cli import _runs

    results = _runs(1)
    assert results[0]["scenario"] == "cli slmops --help"
    for r in results:
        assert all(k in r for k in REQUIRED_KEYS)
        assert r["project"] > 0
        assert r["baseline"] > 0
        assert r["ratio"] == pytest.approx(r["project"] / r["baseline"], rel=0.05)


def test_fleet_status_of_an_unknown_fleet_says_so_plainly(nats_server: object) -> None:
    from click.testing import CliRunner

    url = nats_server.url  # type: ignore[attr-defined]
    result = CliRunner().invoke(main, ["fleet", "status", "--nats", url, "--fleet", "nosuchfleet"])
    assert result.exit_code == 1
    assert "no such fleet 'nosuchfleet': the cloud has no node of it" in result.output
    bad = CliRunner().invoke(main, ["fleet", "status", "--nats", url, "--fleet", "no.such"])
    assert bad.exit_code == 2  # not a fleet id at all: a usage error
