"""The alerts for real: promtool accepts the rule files and passes conf/alerts_test.yml
(every alert on synthetic series: firing after its `for:`, quiet on healthy series and
across restarts); and a real Prometheus on conf/prometheus.yml and its rules, scraping
the real daemons, fires nothing while they are healthy, fires DaemonDown when the
consumer stops (no sooner than its `for:`) and resolves it when the consumer is back."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.conftest import BIN
from tests.rules import (
    ALERTS,
    ALERTS_TEST,
    RECORDING,
    RETENTION_GAUGES,
    metric_names,
    rule_files,
    rules,
)
from tests.system.harness import Bundle, Prometheus, dashboard_exprs, promtool, wait_until

# Every `for:` in the test's copy of the rules: long enough for the start-up's transients
# (a done rate needs two scrapes), short enough for a test. Scrape and evaluation: 1 s.
FOR_S = 10


def test_promtool_accepts_the_rule_files() -> None:
    out = promtool("check", "rules", *rule_files())
    for path in (RECORDING, ALERTS):
        assert f"Checking {path.name}\n  SUCCESS: {len(rules(path))} rules found" in out


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    out = promtool("test", "rules", ALERTS_TEST.name)
    assert "SUCCESS" in out


def test_consumer_stopped_fires_daemon_down_and_its_return_resolves_it(
    bundle: Bundle, tmp_path: Path
) -> None:
    consumer = bundle.consumer(CONSUMER_WORK_SCALE="0.2")
    bundle.producer(PRODUCER_RATE="300")
    with Prometheus(bundle, tmp_path, for_=f"{FOR_S}s") as prom:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        assert {Path(g["file"]).name: len(g["rules"]) for g in groups} == {
            path.name: len(rules(path)) for path in (RECORDING, ALERTS)
        }

        def evaluated() -> list[dict[str, str]]:
            found = [r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
            return found if all(r["health"] != "unknown" for r in found) else []

        failing = [
            r for r in wait_until(evaluated, 15, "every rule evaluated") if r["health"] != "ok"
        ]
        assert not failing, failing
        # The metrics the rules read are those the daemons export (the retention
        # feature's gauges aside); a misspelt one would make its alert silent forever.
        read = set().union(*(metric_names(r["expr"]) for r in rules(RECORDING) + rules(ALERTS)))
        for name in sorted(read - {r["record"] for r in rules(RECORDING)} - RETENTION_GAUGES):
            assert prom.query(f'count({{__name__="{name}"}})'), f"no series {name}"

        # Healthy, for longer than any `for:`: nothing fires, nothing is pending.
        def healthy_s() -> float:
            result = prom.query("count_over_time(:tasks_done:rate1m[1m])")
            return float(result[0]["value"][1]) if result else 0.0

        wait_until(lambda: healthy_s() >= FOR_S + 3, FOR_S + 30, "a healthy stretch", every_s=0.5)
        assert prom.query('max_over_time(ALERTS{alertstate="firing"}[5m])') == []
        assert prom.query("ALERTS") == []
        assert [r["value"][1] for r in prom.query('consumer_serving{job="consumer"}')] == ["1"]

        consumer.terminate()
        assert consumer.wait(30) == 0
        stopped = time.monotonic()
        # Expected: the next scrape fails (1 s), the next evaluation starts the `for:`,
        # which ends FOR_S later; 8 s to spare for a busy machine.
        query = 'ALERTS{alertname="DaemonDown", alertstate="firing"}'
        firing = wait_until(
            lambda: prom.query(query), FOR_S + 10, "DaemonDown firing", every_s=0.25
        )
        fired_after_s = time.monotonic() - stopped
        assert [(a["metric"]["job"], a["metric"]["severity"]) for a in firing] == [
            ("consumer", "page")
        ]
        # Not before its `for:` (less a second: the first failed scrape can come with the
        # exit, just before `stopped` is taken).
        assert fired_after_s >= FOR_S - 1, f"fired {fired_after_s:.1f} s after the stop"
        # The dashboard's alerts panel lists it, and so does `make prometheus`.
        panel = [expr for _, expr in dashboard_exprs() if "ALERTS" in expr]
        for expr in panel:
            assert "DaemonDown" in {r["metric"]["alertname"] for r in prom.query(expr)}, expr
        status = subprocess.run(
            [str(BIN / "python"), "-m", "daemons.bundle", "prometheus", "--url", prom.base],
            env=bundle.env(),
            cwd=bundle.workdir,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        n_alerts, n_recorded = len(rules(ALERTS)), len(rules(RECORDING))
        assert f"alerts.yml, recording.yml: {n_alerts} alerting, {n_recorded} recording" in status
        target = f"127.0.0.1:{bundle.ports['CONSUMER_METRICS_PORT']}"
        assert f"DaemonDown consumer {target}" in status.split("firing: ", 1)[1], status

        bundle.consumer(CONSUMER_WORK_SCALE="0.2")
        back = time.monotonic()
        wait_until(
            lambda: not prom.query('ALERTS{alertname="DaemonDown"}'),
            15,
            "DaemonDown resolved",
            every_s=0.25,
        )
        print(
            f"DaemonDown fired {fired_after_s:.1f} s after the stop (for: {FOR_S} s), "
            f"resolved {time.monotonic() - back:.1f} s after the start"
        )
