"""`slmops bench fleet` as the new-user trial met it: at 200 nodes it logged a line per node
(the in-process cloud's info and per-node warnings) around the figures, ran a 1,440-window
backlog per reconnecting node by default, and its --help did not say what the figures mean.
The bench itself (a cloud, a server, simulated nodes) is `slmops bench fleet`'s own run; these
tests hold the command's defaults and help without running it."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner

import slmops.bench.fleet as fleet_bench
from slmops.bench.fleet_figures import DEFAULT_BACKLOG, FIGURES
from slmops.cli import main


def _figures_written() -> set[str]:
    """The keys ``bench.fleet`` writes into its result (``out = {...}``, ``out["k"] = ...``),
    and the two the command adds (``r["load_before"], r["load_after"]``)."""
    tree = ast.parse(Path(fleet_bench.__file__).read_text())
    keys = {"load_before", "load_after"}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "out":
            assert isinstance(node.value, ast.Dict)
            keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "out"
            and isinstance(node.slice, ast.Constant)
        ):
            keys.add(node.slice.value)
    return keys


def test_bench_help_says_what_every_fleet_figure_means() -> None:
    assert set(FIGURES) == _figures_written()
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    for name in FIGURES:
        assert re.search(rf"^ +{name} +\S", result.output, re.MULTILINE), name
    assert re.search(r"--backlog[^\[]*\[default: 60;", result.output)


def test_bench_fleet_logs_warnings_only_by_default_and_runs_an_hours_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run itself is replaced by one that logs as the in-process cloud does (an info line,
    a warning) and reports every figure: what is held here is the command's wiring."""
    runs: list[dict[str, Any]] = []

    async def run_fleet(**kwargs: Any) -> dict[str, Any]:
        runs.append(kwargs)
        log = structlog.get_logger("slmops.cloud.ingest.apply")
        log.info("routine_line_of_the_cloud")
        log.warning("a_warning_of_the_cloud")
        return {**dict.fromkeys(FIGURES, 1), "nodes": kwargs["nodes"], "exactly_once": True}

    monkeypatch.setattr(fleet_bench, "run_fleet", run_fleet)
    quiet = CliRunner().invoke(main, ["bench", "fleet", "--nodes", "3"])
    assert quiet.exit_code == 0, quiet.output
    assert runs[0]["backlog"] == DEFAULT_BACKLOG == 60
    assert "a_warning_of_the_cloud" in quiet.stderr
    assert "routine_line_of_the_cloud" not in quiet.stderr
    assert "fleet, 3 nodes:" in quiet.stdout
    loud = CliRunner().invoke(main, ["bench", "fleet", "--nodes", "3", "--log-level", "info"])
    assert loud.exit_code == 0, loud.output
    assert "routine_line_of_the_cloud" in loud.stderr
