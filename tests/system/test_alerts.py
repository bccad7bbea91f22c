"""The alerts for real: promtool accepts the rule files and passes conf/alerts_test.yml
(every alert on synthetic series: firing after its `for:`, quiet on healthy series and
across restarts)."""

from __future__ import annotations

from tests.rules import ALERTS, ALERTS_TEST, RECORDING, rule_files, rules
from tests.system.harness import promtool


def test_promtool_accepts_the_rule_files() -> None:
    out = promtool("check", "rules", *rule_files())
    for path in (RECORDING, ALERTS):
        assert f"Checking {path.name}\n  SUCCESS: {len(rules(path))} rules found" in out


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    out = promtool("test", "rules", ALERTS_TEST.name)
    assert "SUCCESS" in out
