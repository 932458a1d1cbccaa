"""The shipped Prometheus files checked by Prometheus' own ``promtool`` (issue 14): the
scrape config and the alert rules parse, and the rules' unit tests
(``deploy/prometheus/slmops-alerts.test.yml``: each alert fires on the series it should and
stays quiet on the ones it should not) pass.

``promtool`` comes from Debian's ``prometheus`` package (``.ci/run`` installs it). Under
``CI=true`` a missing promtool fails; elsewhere the tests skip with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no promtool: .ci/run installs the Debian package prometheus")
        pytest.skip("no promtool on this machine (apt-get install --no-install-recommends prometheus)")
    return found


def _promtool(tool: str, *args: str) -> str:
    done = subprocess.run([tool, *args], cwd=DIR, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_checks_the_config_and_its_rule_file(promtool: str) -> None:
    out = _promtool(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out, out
    out = _promtool(promtool, "check", "rules", "slmops-alerts.yml")
    assert "SUCCESS: 7 rules found" in out, out


def test_alert_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    """Every alert of slmops-alerts.yml has a case in the unit tests, and they pass (among
    them: a rolled-back rollout pruned from the store must not alert — it did with
    ``increase()`` on the gauge)."""
    import yaml

    rules = yaml.safe_load((DIR / "slmops-alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    cases = yaml.safe_load((DIR / "slmops-alerts.test.yml").read_text())
    tested = {a["alertname"] for t in cases["tests"] for a in t.get("alert_rule_test", [])}
    assert alerts == tested, alerts ^ tested
    out = _promtool(promtool, "test", "rules", "slmops-alerts.test.yml")
    assert "SUCCESS" in out, out
