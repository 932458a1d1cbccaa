"""``slmops rollout`` commands against a real server: start validates and records, status shows,
pause/abort are recorded for the controller, bad flags are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from nats.js import JetStreamContext

from _rollout import two_versions
from slmops.cli import main
from slmops.cli_rollout import parse_percent, parse_stages
from slmops.shared.server import EmbeddedServer


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_flag_parsers_accept_percentages_and_refuse_nonsense() -> None:
    assert parse_stages("5, 25,100") == [5, 25, 100]
    assert parse_percent("2%") == pytest.approx(0.02)
    assert parse_percent("0.05") == pytest.approx(0.05)
    assert parse_percent("10") == pytest.approx(0.10)
    with pytest.raises(ValueError, match="not a percentage"):
        parse_percent("lots")
    with pytest.raises(ValueError, match="stages"):
        parse_stages("5,x")


@pytest.mark.anyio
async def test_start_status_pause_abort_round_trip(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    model = f"cli_{fleet}"
    await two_versions(js, tmp_path, fleet, model)
    url = nats_server.url

    def cli(*args: str) -> tuple[int, str]:
        return _invoke("rollout", *args)

    code, out = await anyio.to_thread.run_sync(
        lambda: cli("start", "--nats", url, "--fleet", fleet, "--version", "2", "--stages", "10,5,100")
    )
    assert code != 0
    assert "stages" in out
    code, out = await anyio.to_thread.run_sync(
        lambda: cli("start", "--nats", url, "--fleet", fleet, "--version", "9", "--soak", "1s")
    )
    assert code != 0
    assert "version 9 is not in the registry" in out
    # --min-quality on a classifier (no quality set in its bundles): refused at start, not
    # installed on canaries to fail its gate there (new-user trial).
    code, out = await anyio.to_thread.run_sync(
        lambda: cli("start", "--nats", url, "--fleet", fleet, "--version", "2", "--min-quality", "80%")
    )
    assert code != 0
    assert "--min-quality needs a quality set" in out, out
    assert "fp32 has none" in out, out
    code, out = await anyio.to_thread.run_sync(
        lambda: cli(
            "start", "--nats", url, "--fleet", fleet, "--version", "2", "--soak", "1s", "--max-failures", "5%"
        )
    )
    assert code == 0, out
    assert "v2 (from v1)" in out
    code, out = await anyio.to_thread.run_sync(
        lambda: cli("start", "--nats", url, "--fleet", fleet, "--version", "2")
    )
    assert code != 0
    assert "still running" in out
    code, out = await anyio.to_thread.run_sync(
        lambda: cli("status", "--nats", url, "--fleet", fleet, "--json")
    )
    assert code == 0, out
    (state,) = json.loads(out)
    assert (state["version"], state["previous_version"], state["status"]) == (2, 1, "running")
    assert state["config"]["max_failures"] == pytest.approx(0.05)
    assert state["config"]["soak_s"] == pytest.approx(1.0)
    code, out = await anyio.to_thread.run_sync(lambda: cli("pause", "--nats", url, "--fleet", fleet))
    assert code == 0, out
    code, out = await anyio.to_thread.run_sync(lambda: cli("status", "--nats", url, "--fleet", fleet))
    assert code == 0, out
    assert f"{model} v1 → v2" in out
    code, out = await anyio.to_thread.run_sync(
        lambda: cli("status", "--nats", url, "--fleet", fleet, "--json")
    )
    assert json.loads(out)[0]["command"] == "pause"
    code, out = await anyio.to_thread.run_sync(lambda: cli("abort", "--nats", url, "--fleet", "f_norollout"))
    assert code != 0
    assert "no rollout" in out


def test_status_table_shows_gate_figures_or_the_reason_there_are_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A gate without figures (no labelled answers, no control group) prints its detail, not
    Python's ``None``; figures are rounded; one node is "1 node" (new-user trial)."""
    from slmops.cli_rollout import _print_state
    from slmops.cloud.rollout.state import NodeEntry, RolloutState

    state = RolloutState(
        id="r1", fleet="shops", model="topics", version=2, previous_version=1, created=0.0, stage_started=0.0,
        nodes={"till-1": NodeEntry(stage=0, assigned_at=0.0)},
        gates={
            "accuracy": {"outcome": "pass", "canary": None, "control": None, "limit": None,
                         "detail": "no labelled answers yet"},
            "latency_p95": {"outcome": "pass", "canary": 12.345678, "control": 11.0, "limit": 1.5,
                            "detail": ""},
        },
    )  # fmt: skip
    _print_state(state)
    out = capsys.readouterr().out
    assert "None" not in out, out
    assert "1 node assigned" in out, out
    assert "gate accuracy     pass  (no labelled answers yet)" in out, out
    assert "gate latency_p95  pass  canary 12.35  control 11  limit 1.5" in out, out
