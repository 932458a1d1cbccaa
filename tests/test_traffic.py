"""`slmops traffic` sends held-out corpus texts to a real node (real ORT, real SQLite) at a
steady rate and reports what the node answered; bad topics and unreachable nodes say so."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from _edge_util import Keys, edge_config
from slmops.cli import main
from slmops.edge.api import serve_api
from slmops.edge.node import EdgeNode
from slmops.traffic import send_traffic


@pytest.mark.anyio
async def test_traffic_reaches_a_real_node_and_counts_its_answers(tmp_path: Path, fleet: str) -> None:
    keys = Keys(tmp_path / "keys")
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=keys.bundle().path, http="127.0.0.1:0", window=60.0)
    async with EdgeNode(cfg) as node, serve_api(node) as api:
        url = f"http://127.0.0.1:{api.port}"
        report = await send_traffic(url, count=41, rate=2000, batch=4, shift=("sports",), feedback=True)
        assert (report.sent, report.answered, report.failed) == (41, 41, 0)
        (model,) = report.models
        assert model.endswith(" v1 fp32")
        # The test model's labels are not the corpus topics: the node refuses that feedback.
        assert report.feedback == 0
        assert "41 answered" in report.line()
        with pytest.raises(ValueError, match="unknown topic"):
            await send_traffic(url, count=1, rate=10, shift=("no-such-topic",))


@pytest.mark.anyio
async def test_traffic_to_no_node_fails_saying_why(tmp_path: Path) -> None:
    report = await send_traffic("http://127.0.0.1:9", count=8, rate=1000)
    assert (report.answered, report.failed) == (0, 8)
    assert report.last_error


def test_the_traffic_command_exits_1_when_nothing_was_answered() -> None:
    result = CliRunner().invoke(
        main, ["traffic", "--url", "http://127.0.0.1:9", "--count", "4", "--rate", "1000"]
    )
    assert result.exit_code == 1
    assert "0 answered" in result.output
