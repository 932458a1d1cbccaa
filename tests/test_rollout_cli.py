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
