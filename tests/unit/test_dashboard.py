"""The Grafana provisioning is consistent: the "Tasks" dashboard, its datasource and the
file provider that loads it. (Every panel query is run against a real Prometheus in
tests/system/test_observability.py; here only the files are checked.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.conftest import ROOT
from tests.rules import RECORDING, expand, metric_names, recorded

GRAFANA = ROOT / "provisioning" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tasks.json"
DATASOURCE = GRAFANA / "datasources" / "prometheus.yml"
PROVIDER = GRAFANA / "dashboards" / "dashboards.yml"
# Where the VM installs the dashboards' JSON (provisioning/grafana/dashboards/*.json).
DASHBOARDS_DIR = "/var/lib/grafana/dashboards"

# Every metric the daemons export (the metrics contract); a panel may use only these.
METRICS = {
    "up",
    "tasks_build_info",
    "tasks_in_state",
    "db_pool_size",
    "db_pool_available",
    "db_pool_max",
    "db_pool_requests_waiting",
    "db_write_failing",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "tasks_produced_total",
    "producer_backlog",
    "producer_paused",
    "producer_send_errors_total",
    "producer_redelivered_total",
    "producer_refused_total",
    "producer_batch_size_bucket",
    "producer_batch_size_sum",
    "producer_batch_size_count",
    "grpc_client_handled_total",
    "grpc_client_handling_seconds_bucket",
    "tasks_received_total",
    "tasks_rejected_total",
    "tasks_processing",
    "consumer_serving",
    "tasks_done_total",
    "tasks_value_sum_total",
    "task_processing_seconds_bucket",
    "task_latency_seconds_bucket",
    "consumer_db_batch_size_bucket",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
    "tasks_done_in_db",
    "tasks_value_sum_in_db",
    "tasks_retention_seconds",
    "tasks_partitions",
    "tasks_partitions_ahead",
    "tasks_oldest_done_age_seconds",
    "tasks_partitions_dropped_total",
    "tasks_retention_removed_total",
    "tasks_maintenance_seconds_bucket",
}
# Series Prometheus writes itself (the state of every alert of conf/alerts.yml).
PROMETHEUS_SERIES = {"ALERTS"}


def yaml_values(text: str, key: str) -> list[str]:
    """Values of every `key: value` line of a simple YAML file (no YAML parser in the
    venv; the provisioning files are flat enough for this)."""
    out = []
    for match in re.finditer(rf"^\s*(?:- )?{key}:\s*(.*?)\s*$", text, re.M):
        value = match.group(1).split(" #", 1)[0].strip()
        out.append(value.strip("'\""))
    return out


def one(text: str, key: str) -> str:
    values = yaml_values(text, key)
    assert len(values) == 1, (key, values)
    return values[0]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # panels inside collapsed rows


def exprs() -> list[str]:
    return [t["expr"] for p in all_panels(dashboard()["panels"]) for t in p.get("targets", [])]


def test_datasource_is_the_default_prometheus_with_a_fixed_uid() -> None:
    text = DATASOURCE.read_text()
    assert one(text, "apiVersion") == "1"
    assert one(text, "type") == "prometheus"
    assert one(text, "uid") == "tasks-prometheus"
    assert one(text, "url") == "http://127.0.0.1:9090"
    assert one(text, "isDefault") == "true"


def test_dashboard_is_tasks_and_every_panel_uses_the_provisioned_datasource() -> None:
    uid = one(DATASOURCE.read_text(), "uid")
    dash = dashboard()
    assert dash["title"] == "Tasks" and dash["uid"] == "tasks"
    panels = list(all_panels(dash["panels"]))
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", {"uid": uid})["uid"] == uid, panel["title"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard()["panels"]):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells[(x, y)])
                cells[(x, y)] = panel["title"]


def test_panels_cover_the_observability_issue() -> None:
    # What each query computes, with the recorded series it reads spelt out.
    expanded = [expand(e) for e in exprs()]
    joined = "\n".join(expanded)
    for needle in (
        "max by (state) (tasks_in_state)",
        "max by (type) (tasks_value_sum_in_db)",
        "max by (type) (tasks_done_in_db)",
        "tasks_oldest_done_age_seconds",
        "tasks_partitions_ahead",
        "rate(tasks_produced_total[1m])",
        "sum(rate(tasks_done_total[1m]))",
        "tasks_rejected_total",
        "producer_backlog",
        "producer_paused",
        "tasks_processing",
        "task_processing_seconds_bucket",
        "task_latency_seconds_bucket",
        "db_pool_available",
        "rate(process_cpu_seconds_total[1m])",
        "process_resident_memory_bytes",
    ):
        assert needle in joined, needle
    assert any("up" in metric_names(e) for e in expanded), "a panel shows up per job"
    for metric in ("task_processing_seconds_bucket", "task_latency_seconds_bucket"):
        quantiles = [e for e in expanded if metric in e and e.startswith("histogram_quantile(")]
        assert {e.split(",")[0] for e in quantiles} >= {
            "histogram_quantile(0.5",
            "histogram_quantile(0.99",
        }, metric


def test_panels_use_only_exported_metrics() -> None:
    for expr in exprs():
        unknown = metric_names(expr) - METRICS - set(recorded()) - PROMETHEUS_SERIES
        assert not unknown, (expr, unknown)


def test_panels_read_the_recorded_series_instead_of_computing_them_again() -> None:
    """What conf/recording.yml records, the panels read from there, so a panel and the
    alert about the same thing show the same number."""
    used = set().union(*(metric_names(e) for e in exprs()))
    for name, expr in recorded().items():
        assert name in used, f"{RECORDING.name}: {name} is on no panel"
        for panel_expr in exprs():
            assert expr not in panel_expr, f"read {name} instead of {panel_expr}"


def test_the_last_panel_lists_the_firing_alerts() -> None:
    panels = dashboard()["panels"]
    last = panels[-1]
    assert last["title"] == "Firing alerts" and last["type"] == "table"
    assert [t["expr"] for t in last["targets"]] == ['ALERTS{alertstate="firing"}']
    assert last["targets"][0]["instant"] and last["targets"][0]["format"] == "table"
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels[:-1])
    assert (last["gridPos"]["x"], last["gridPos"]["y"], last["gridPos"]["w"]) == (0, bottom, 24)


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, method) (rate(a_bucket{job="x"}[1m])))'
    ) == {"a_bucket"}
    assert metric_names("db_pool_size - db_pool_available") == {"db_pool_size", "db_pool_available"}
    assert metric_names("max by (state) (tasks_in_state) or up") == {"tasks_in_state", "up"}


def test_file_provider_reads_the_folder_the_dashboards_are_installed_in() -> None:
    text = PROVIDER.read_text()
    assert one(text, "apiVersion") == "1"
    assert one(text, "type") == "file"
    assert one(text, "path") == DASHBOARDS_DIR
    # What the VM installs there: the JSON files next to dashboards.yml in the repository.
    assert DASHBOARD.parent == PROVIDER.parent
    assert DASHBOARD in PROVIDER.parent.glob("*.json")
