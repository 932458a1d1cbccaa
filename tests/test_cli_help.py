"""`slmops --help` and every subcommand's `--help` import none of the heavy libraries (numpy,
onnxruntime, scipy, aiohttp — nats-py pulls in aiohttp): they are imported by the commands
that need them, when they run. The mechanism is asserted, not a time (`slmops bench cli`
measures the time against `python -c pass`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import click

from slmops.cli import main

HEAVY = ("numpy", "onnxruntime", "scipy", "aiohttp", "nats")


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
