"""Observability against real parts: conf/prometheus.yml passes promtool, and every query
of the Grafana "Tasks" dashboard returns numbers (not only NaN) from a real Prometheus,
running that config (and its recording rules), scraping the real daemons; the per-type
panels show exactly what the database holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import states
from tests.rules import PROMETHEUS_CONF
from tests.system.harness import (
    Bundle,
    Prometheus,
    dashboard_exprs,
    db_done_by_type,
    promtool,
    wait_until,
)


def test_promtool_accepts_the_prometheus_config() -> None:
    assert "SUCCESS" in promtool("check", "config", PROMETHEUS_CONF.name)


def test_every_dashboard_query_returns_data_from_the_real_daemons(
    bundle: Bundle, tmp_path: Path
) -> None:
    # The alerts panel has rows only while an alert fires: test_alerts.py runs it then;
    # here it must only be a valid query.
    exprs = [(title, expr) for title, expr in dashboard_exprs() if "ALERTS" not in expr]
    alert_exprs = [expr for _, expr in dashboard_exprs() if "ALERTS" in expr]
    assert exprs and alert_exprs

    bundle.consumer(CONSUMER_WORK_SCALE="0.2")
    producer = bundle.producer(PRODUCER_RATE="300")
    with Prometheus(bundle, tmp_path) as api:
        wait_until(lambda: states(bundle.db_url)["done"] >= 100, 20, "tasks done")

        # Rates need two samples in their window, after the work above: 3+ scrapes each.
        def scrapes() -> dict[str, float]:
            result = api.query("count_over_time(up[1m])")
            return {r["metric"]["job"]: float(r["value"][1]) for r in result}

        wait_until(
            lambda: (s := scrapes()).keys() == {"producer", "consumer"} and min(s.values()) >= 3,
            15,
            "3 scrapes of each target",
            every_s=0.25,
        )

        def no_number(expr: str) -> bool:
            """No series, or only NaN ones (0/0 of an idle rate, a quantile of nothing):
            a panel that draws nothing."""
            return all(math.isnan(float(r["value"][1])) for r in api.query(expr))

        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in exprs if no_number(expr)]

        missing: list[str] = []

        def all_have_data() -> bool:
            missing[:] = empty()
            return not missing

        try:
            wait_until(all_have_data, 15, "every dashboard query to return a series", every_s=0.5)
        except AssertionError:
            pytest.fail("dashboard queries without any series:\n  " + "\n  ".join(missing))
        for expr in alert_exprs:
            api.query(expr)  # a malformed query fails here (bad_data)
        # And with real values: the pipeline's numbers came through.
        done = sum(float(r["value"][1]) for r in api.query("sum(tasks_done_total)"))
        assert done >= 100
        up = {r["metric"]["job"]: r["value"][1] for r in api.query("up")}
        assert up == {"producer": "1", "consumer": "1"}

        # Values, not only presence: with the producer stopped and the consumer idle, the
        # per-type panels show what the database holds (within a scrape and a refresh).
        producer.terminate()
        assert producer.wait(15) == 0
        wait_until(lambda: states(bundle.db_url)["processing"] == 0, 15, "consumer idle")
        db = db_done_by_type(bundle.db_url)
        panels = dict(exprs)

        def panel(title: str) -> dict[int, int]:
            return {
                int(r["metric"]["type"]): int(float(r["value"][1]))
                for r in api.query(panels[title])
            }

        wait_until(
            lambda: panel("Processed tasks per type") == {t: n for t, (n, _) in db.items()},
            15,
            "the per-type done panel equals the database",
            every_s=0.5,
        )
        assert panel("Total value per type") == {t: v for t, (_, v) in db.items()}
