"""JSON log lines carry plain JSON values, never Python reprs (issue 14 follow-up): the
``drift_baseline`` line's period was written as ``"datetime.datetime(2026, ...)"``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from slmops.bench._fleet import MODEL, SyntheticFleet, manifest_for
from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector
from slmops.shared.logging import configure_logging, get_logger
from slmops.shared.vocabulary import DriftSignal

Capture = pytest.CaptureFixture[str]


@pytest.fixture
def json_logs() -> None:
    """JSON lines at info (conftest restores structlog's configuration after the test)."""
    configure_logging("info", json=True)


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_drift_baseline_line_has_iso_times_not_reprs(json_logs: None, capsys: Capture) -> None:
    """A detector warms up on 5 nodes until its automatic baseline is accepted; the
    ``drift_baseline`` line's ``start``/``end`` are ISO 8601 strings that parse back."""
    configure_logging("info", json=True)  # binds the captured stderr
    fleet = SyntheticFleet("logs", 5, 3)
    det = DriftDetector(DriftConfig(calibration_windows=20_000), clock=lambda: datetime.now(UTC))
    det.add_group(fleet.fleet, MODEL, manifest_for())
    for w in range(1, 30):
        for i in range(5):
            det.observe(fleet.aggregate(i, w))
    err = capsys.readouterr().err
    assert "datetime.datetime(" not in err
    lines = [d for d in _lines(err) if d["event"] == "drift_baseline"]
    assert lines, err[-2000:]
    line = lines[0]
    assert isinstance(line["start"], str)
    assert isinstance(line["end"], str)
    assert datetime.fromisoformat(line["start"]) <= datetime.fromisoformat(line["end"])
    assert isinstance(line["signals"], list)


def test_hostile_values_are_logged_as_plain_strings(json_logs: None, capsys: Capture) -> None:
    """Paths, exceptions, enums, sets, tuple-keyed dicts and arbitrary objects: every line is
    valid JSON and no value is a ``repr()``."""
    configure_logging("info", json=True)
    get_logger("t").info(
        "hostile",
        path=Path("/var/lib/x"),
        exc=ValueError("bad input"),
        kind=DriftSignal("class_prior"),
        tags={"a"},
        pairs={(1, 2): 3},
        when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    (line,) = [d for d in _lines(capsys.readouterr().err) if d["event"] == "hostile"]
    assert line["path"] == "/var/lib/x"
    assert line["exc"] == "bad input"
    assert line["kind"] == "class_prior"
    assert line["tags"] == ["a"]
    assert line["pairs"] == {"(1, 2)": 3}
    assert line["when"] == "2026-01-02T03:04:05Z"
