"""The example alerting rules are valid and each alert's unit tests pass (promtool)."""

import os
import subprocess

from conftest import require_tool

RULES = os.path.join(os.path.dirname(__file__), "..", "examples", "prometheus")


def promtool(*args):
    result = subprocess.run([require_tool("promtool"), *args], cwd=RULES, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_rules_are_valid():
    assert "SUCCESS: 9 rules found" in promtool("check", "rules", "alerts.yml")


def test_every_alert_has_a_passing_unit_test():
    with open(os.path.join(RULES, "alerts.yml")) as f:
        alerts = {line.split(":", 1)[1].strip() for line in f if line.strip().startswith("- alert:")}
    with open(os.path.join(RULES, "alerts_test.yml")) as f:
        tested = {line.split(":", 1)[1].strip() for line in f
                  if line.strip().startswith("alertname:")}
    assert alerts == tested
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
