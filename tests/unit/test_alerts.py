"""The alerting and recording rules as files: Prometheus loads them, every alert says how
bad it is, explains its threshold and duration, links its runbook entry, is tested both
firing and quiet, and names only metrics the daemons export. (promtool checks and tests
them, and a real Prometheus runs them against the real daemons, in
tests/system/test_alerts.py.)"""

from __future__ import annotations

import re

from tests.rules import (
    ALERTS,
    ALERTS_TEST,
    RECORDING,
    RETENTION_GAUGES,
    RUNBOOK,
    metric_names,
    recorded,
    rule_files,
    rules,
)
from tests.unit.test_dashboard import METRICS

SEVERITIES = {"page", "ticket"}
RUNBOOK_PARTS = ("**Means.**", "**Confirm.**", "**Do.**", "**Resolves**")


def alert_names() -> list[str]:
    return [rule["alert"] for rule in rules(ALERTS)]


def anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_prometheus_loads_the_recording_rules_and_the_alerts_that_are_tested() -> None:
    assert rule_files() == [RECORDING.name, ALERTS.name]
    tested = re.search(r"^rule_files:\n((?:[ \t]+- .*\n)+)", ALERTS_TEST.read_text(), re.M)
    assert tested and re.findall(r"- (\S+)", tested.group(1)) == rule_files()


def test_every_alert_has_a_severity_a_summary_and_its_runbook_entry() -> None:
    names = alert_names()
    assert len(names) == len(set(names)) >= 10
    for rule in rules(ALERTS):
        name = rule["alert"]
        assert rule.get("severity") in SEVERITIES, name
        assert rule.get("summary") and rule.get("description"), name
        assert rule.get("runbook_url") == f"conf/{RUNBOOK.name}#{anchor(name)}", name
    # One entry per alert, in the same order, each with the same four parts.
    text = RUNBOOK.read_text()
    assert re.findall(r"^## (.+)$", text, re.M) == names
    for name, entry in zip(names, re.split(r"^## .+$", text, flags=re.M)[1:], strict=True):
        for part in RUNBOOK_PARTS:
            assert part in entry, (name, part)


def test_every_threshold_and_duration_is_explained_next_to_the_rule() -> None:
    for rule in rules(ALERTS):
        comment = rule["comment"]
        assert len(comment) > 100, rule["alert"]
        if "for" in rule:
            assert f"for {rule['for']}:" in comment, rule["alert"]
        else:
            assert "no `for:`" in comment, rule["alert"]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?\n", ALERTS_TEST.read_text())
    for name in alert_names():
        assert (name, "") in cases, f"{name}: no test where it fires"
        assert (name, " []") in cases, f"{name}: no test where it stays quiet"


def test_rules_name_only_exported_or_recorded_metrics() -> None:
    names = set(recorded())
    assert all(re.fullmatch(r"\w*:\w+:\w+", name) for name in names), "level:metric:operations"
    for rule in rules(RECORDING) + rules(ALERTS):
        unknown = metric_names(rule["expr"]) - METRICS - names - RETENTION_GAUGES
        assert not unknown, (rule.get("alert") or rule["record"], unknown)
    for rule in rules(RECORDING):  # recordings are built from the daemons' metrics only
        assert not metric_names(rule["expr"]) & names, rule["record"]
