"""`slmops demo`: the shortened story end to end (only the pace and the node count shrink;
every timeout stays at its default), its failure report and its bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.demo.report import log_line, rollout_failure
from slmops.demo.story import PHASES, DemoOptions, Story, run_demo
from slmops.demo.view import phase_line
from slmops.shared.messages import RolloutEvent


@pytest.mark.slow
@pytest.mark.timeout(900)  # the phases' own bounds (default 240 s each) fire first
@pytest.mark.anyio
async def test_the_demo_story_runs_end_to_end() -> None:
    lines: list[str] = []
    # The demo's defaults; its default seed (0) is the session's `minilm_default`'s, so the
    # MiniLM build comes from the factory's user cache.
    opts = DemoOptions(nodes=3, duration=20.0)
    summary = await run_demo(opts, on_phase=lambda s: lines.append(phase_line(s)))
    assert summary["ok"], json.dumps({k: summary[k] for k in ("failure", "checks", "phases", "notes")})
    # One line per phase, numbered 1..8 without gaps, and the summary lists the same phases.
    assert [line.split("] ")[1].split(" ")[0] for line in lines] == [f"{i}/8" for i in range(1, 9)]
    assert [p["phase"] for p in summary["phases"]] == [f"{i}/8" for i in range(1, 9)]
    assert all(r["served"] == r["counted"] > 0 for r in summary["nodes"])
    assert summary["versions"] == [2]
    assert any("minilm int8-l3" in note for note in summary["notes"]), summary["notes"]
    assert summary["workdir"] is None  # a passing run leaves nothing behind


def test_a_rolled_back_rollout_is_reported_with_the_check_its_figures_and_the_log_line(
    tmp_path: Path,
) -> None:
    log = tmp_path / "cloud.log"
    log.write_text(
        '{"event": "rollout_started"}\n{"event": "rollout_gate_failed", "reason": "gate failed"}\n'
    )
    gates = {
        "latency_p95": {"name": "latency_p95", "outcome": "fail", "canary": 9.5, "control": 4.7, "limit": 1.5,
                        "samples": 468, "detail": "p95 9.5 ms vs 4.7 ms, ratio 2.02"},
        "error_rate": {"name": "error_rate", "outcome": "pass", "canary": 0.0, "control": 0.0, "limit": 0.01},
    }  # fmt: skip
    common = {"rollout": "r", "fleet": "demo", "model": "topics", "version": 2, "previous_version": 1,
              "stage": 0, "percent": 20, "time": "2026-11-30T12:00:00Z"}  # fmt: skip
    story = Story(number=6, phase="the cloud recalibrates")
    story.rollout_events = [
        RolloutEvent(state="gate_failed", gates=gates, reason="gate failed: latency_p95", **common),  # type: ignore[arg-type]
        RolloutEvent(state="rolled_back", reason="gate failed: latency_p95", **common),  # type: ignore[arg-type]
    ]
    failed = rollout_failure(story, story.rollout_events[1], log)
    assert failed.phase == "6/8 the cloud recalibrates"
    assert failed.what == "the rollout of v2 rolled back at stage 1 (20%)"
    assert failed.detail.startswith("latency_p95 fail: canary 9.5 vs control 4.7 (limit 1.5)")
    assert "error_rate" not in failed.detail  # only the checks that failed
    assert failed.log == f"{log}:2"
    assert log_line(tmp_path / "missing.log", "x") == str(tmp_path / "missing.log")


def test_phases_are_numbered_without_gaps() -> None:
    story = Story(number=4, phase="x")
    assert phase_line(story).endswith("] 4/8 x")
    assert len(PHASES) == story.total == 8


def test_bench_demo_reports_each_runs_outcome_time_and_cache_state_and_stops_its_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bench's bookkeeping on a stand-in for `slmops demo --json` (the real story runs in
    the end-to-end test above): outcome, wall time, warm or cold, why a run failed; the busy
    processes are gone afterwards."""
    import os
    import sys

    from slmops.bench import demo as bench_demo

    def children() -> set[int]:  # live child processes of this one, from /proc
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.add(int(stat.parent.name))
        return found

    script = (
        "import json, os, sys; n = int(open(os.environ['SLMOPS_CACHE_DIR'] + '/n', 'a+').tell()); "
        "open(os.environ['SLMOPS_CACHE_DIR'] + '/n', 'a').write('x'); "
        "ok = n != 1; print(json.dumps({'ok': ok, 'model_cached': n > 0, 'phases': [], "
        "'failure': None if ok else {'what': 'the rollout of v2 rolled back', 'detail': 'latency_p95 fail', "
        "'log': 'cloud.log:25'}})); sys.exit(0 if ok else 1)"
    )
    monkeypatch.setattr(bench_demo, "_demo_cmd", lambda nodes: [sys.executable, "-c", script])
    said: list[str] = []
    before = children()
    (result,) = bench_demo._runs(3, 1, None, said.append)
    assert children() == before  # the load process was stopped
    outcomes = [(r["run"], r["ok"], r["model"]) for r in result["runs"]]
    assert outcomes == [(1, True, "cold"), (2, False, "warm"), (3, True, "warm")]
    assert result["runs"][1]["why"] == "the rollout of v2 rolled back"
    assert result["runs"][1]["log"] == "cloud.log:25"
    assert (result["project"], result["baseline"], result["units"]) == (2, 3, "runs passed")
    assert said[1].startswith("run 2/3: FAILED in ")
    assert all(r["seconds"] > 0 for r in result["runs"])
