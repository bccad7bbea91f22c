"""The Prometheus rule files of conf/, read without a YAML parser (the venv has none):
they keep to one shape (`- alert:` / `- record:` items with plain, quoted, `|` or `>-`
values), which is all this reads; and the series a PromQL expression reads. promtool
reads the files for real in tests/system/test_alerts.py. Shared by the unit tests and
the system harness."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

CONF = ROOT / "conf"
RECORDING = CONF / "recording.yml"
ALERTS = CONF / "alerts.yml"
ALERTS_TEST = CONF / "alerts_test.yml"
RUNBOOK = CONF / "runbook.md"
PROMETHEUS_CONF = CONF / "prometheus.yml"
# Exported by the retention feature (partitioned tasks, a maintenance loop), which lands
# separately: its alerts are ready, and stay quiet while no daemon exports these.
RETENTION_GAUGES = {
    "tasks_oldest_done_age_seconds",
    "tasks_retention_seconds",
    "tasks_partitions_ahead",
}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}

_KEY = re.compile(r"^(?P<indent>\s*)(?:- )?(?P<key>\w+):(?: (?P<value>.*))?$")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def rules(path: Path) -> list[dict[str, str]]:
    """Each rule as {key: value} over all its levels (alert or record, expr, for, the
    labels and annotations), plus `comment`: the comment lines right above it."""
    out: list[dict[str, str]] = []
    comment: list[str] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip().startswith("#"):
            comment.append(line.strip().lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match:
            comment = []
            continue
        key, value = match["key"], (match["value"] or "").strip()
        if key in ("alert", "record"):
            out.append({key: _unquote(value), "comment": " ".join(comment)})
        comment = []
        if value in ("|", ">-"):  # a block: the lines indented deeper than the key
            block = []
            while i < len(lines) and (
                not lines[i].strip()
                or len(lines[i]) - len(lines[i].lstrip()) > len(line) - len(line.lstrip())
            ):
                block.append(lines[i].strip())
                i += 1
            value = ("\n" if value == "|" else " ").join(block).strip()
        if out and key not in ("alert", "record"):
            out[-1][key] = _unquote(value)
    return out


def recorded() -> dict[str, str]:
    """{recorded series: its expression}"""
    return {r["record"]: r["expr"] for r in rules(RECORDING)}


def expand(expr: str) -> str:
    """`expr` with every recorded series replaced by the expression it records (for
    reading what a query computes; not for running)."""
    for name, body in recorded().items():
        expr = re.sub(rf"(?<![\w:]){re.escape(name)}(?![\w:])", lambda _m, b=body: b, expr)
    return expr


def rule_files() -> list[str]:
    """The rule_files of conf/prometheus.yml, as written (relative to conf/)."""
    block = re.search(r"^rule_files:\n((?:[ \t]+- .*\n)+)", PROMETHEUS_CONF.read_text(), re.M)
    return re.findall(r"- (\S+)", block.group(1)) if block else []


def metric_names(expr: str) -> set[str]:
    """The series a PromQL expression reads (not its functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", expr):
        rest = expr[match.end() :].lstrip()
        if not rest.startswith("(") and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names
