"""Observability against real parts: conf/prometheus.yml passes promtool, and every query
of the Grafana "Tasks" dashboard returns data from a real Prometheus, running that
config, scraping the real daemons."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, need, states, stop_process
from tests.system.harness import Bundle, wait_until

PROMETHEUS_CONF = ROOT / "conf" / "prometheus.yml"
DASHBOARD = ROOT / "provisioning" / "grafana" / "dashboards" / "tasks.json"
# The targets conf/prometheus.yml scrapes (the daemons' default metrics ports).
DEFAULT_TARGETS = {"producer": "127.0.0.1:9101", "consumer": "127.0.0.1:9102"}


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool not installed (Debian package prometheus)")
    out = subprocess.run(
        [str(promtool), "check", "config", str(PROMETHEUS_CONF)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def render_config(targets: dict[str, str], interval: str) -> str:
    """conf/prometheus.yml with its targets and intervals replaced, nothing else."""
    text = PROMETHEUS_CONF.read_text()
    for job, default in DEFAULT_TARGETS.items():
        assert text.count(f'"{default}"') == 1, f"{PROMETHEUS_CONF}: one target for {job}"
        text = text.replace(f'"{default}"', f'"{targets[job]}"')
    text, n = re.subn(
        r"^(\s*(?:scrape_interval|evaluation_interval):\s*)\S+",
        rf"\g<1>{interval}",
        text,
        flags=re.M,
    )
    assert n >= 1, f"{PROMETHEUS_CONF}: no scrape_interval to rewrite"
    return text


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows included."""
    out: list[tuple[str, str]] = []
    stack = list(json.loads(DASHBOARD.read_text())["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
    return out


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            if err.code == 400:  # bad_data: the query itself is wrong, waiting won't help
                raise AssertionError(f"{path} {params}: {body}") from None
            raise

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]  # type: ignore[no-any-return]

    def targets_up(self) -> dict[str, str]:
        active = self.get("/api/v1/targets", state="active")["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}


def test_every_dashboard_query_returns_data_from_the_real_daemons(
    bundle: Bundle, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    need(binary is not None, "prometheus not installed (Debian package prometheus)")
    exprs = dashboard_exprs()
    assert exprs

    bundle.consumer(CONSUMER_WORK_SCALE="0.2")
    bundle.producer(PRODUCER_RATE="300")
    targets = {
        job: f"127.0.0.1:{bundle.ports[job.upper() + '_METRICS_PORT']}" for job in DEFAULT_TARGETS
    }
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config(targets, "1s"))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen(
        [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = Prometheus(f"http://127.0.0.1:{port}")
    try:
        started = wait_until(
            lambda: prom.poll() is not None or api.ready(), 20, "prometheus ready", every_s=0.2
        )
        assert started and prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        wait_until(
            lambda: api.targets_up() == {"producer": "up", "consumer": "up"},
            15,
            "both targets up",
            every_s=0.25,
        )
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

        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in exprs if not api.query(expr)]

        missing: list[str] = []

        def all_have_data() -> bool:
            missing[:] = empty()
            return not missing

        try:
            wait_until(all_have_data, 15, "every dashboard query to return a series", every_s=0.5)
        except AssertionError:
            pytest.fail("dashboard queries without any series:\n  " + "\n  ".join(missing))
        # And with real values: the pipeline's numbers came through.
        done = sum(float(r["value"][1]) for r in api.query("sum(tasks_done_total)"))
        assert done >= 100
        up = {r["metric"]["job"]: r["value"][1] for r in api.query("up")}
        assert up == {"producer": "1", "consumer": "1"}
    finally:
        stop_process(prom, 15)
        log.close()
