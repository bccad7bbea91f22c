"""The supervisor configuration `make run` writes, parsed by supervisor itself."""

import json
import shutil
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from daemons.bundle import (
    consumer_target,
    describe_prometheus,
    supervisor_conf,
    write_scrape_targets,
)
from daemons.settings import STOPWAIT_ENV, ConsumerSettings, ProducerSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of conf/ with the var/ directories `make run` creates first."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "var" / "log").mkdir(parents=True)
    (tmp_path / "var" / "run").mkdir()
    return tmp_path


def _programs(conf_text: str, tmp_path: Path) -> dict[str, list[str]]:
    path = tmp_path / "supervisord.conf"
    path.write_text(conf_text)
    opts = ServerOptions()
    opts.configfile = str(path)
    opts.process_config(do_usage=False)
    return {g.name: [p.name for p in g.process_configs] for g in opts.process_group_configs}


def test_default_bundle_programs(root: Path, tmp_path: Path) -> None:
    progs = _programs(supervisor_conf(root, local_db=True, prometheus=True), tmp_path)
    assert progs == {
        "postgres": ["postgres"],
        "prometheus": ["prometheus"],
        "migrate": ["migrate"],
        "consumer": ["consumer"],
        "producer": ["producer"],
    }
    assert "postgres" not in _programs(supervisor_conf(root, False, False), tmp_path)


def test_scaled_bundle_adds_numbered_instances(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXTRA_CONSUMERS", "2")
    monkeypatch.setenv("EXTRA_PRODUCERS", "0")
    progs = _programs(supervisor_conf(root, False, False, scaled=True), tmp_path)
    assert progs["consumers"] == ["consumer_1", "consumer_2"]
    assert progs["producers"] == []
    assert progs["consumer"] == ["consumer"]


def test_targets_for_several_consumers(tmp_path: Path) -> None:
    assert consumer_target(1) == "127.0.0.1:50051"
    assert consumer_target(3) == "ipv4:127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053"
    write_scrape_targets(tmp_path, consumers=3, producers=1)
    doc = json.loads((tmp_path / "extra-consumers.json").read_text())
    assert doc == [{"targets": ["127.0.0.1:9112", "127.0.0.1:9122"], "labels": {}}]
    assert json.loads((tmp_path / "extra-producers.json").read_text()) == []


def test_make_prometheus_describes_the_rules_and_alerts() -> None:
    groups = [
        {"file": "/x/conf/recording.yml", "rules": [{"type": "recording", "name": "a:b:c"}] * 5},
        {
            "file": "/x/conf/alerts.yml",
            "rules": [
                {"type": "alerting", "name": "DaemonDown", "health": "ok"},
                {"type": "alerting", "name": "TasksStuck", "health": "err"},
            ],
        },
    ]
    alert = {"alertname": "DaemonDown", "severity": "page", "job": "consumer", "instance": "i:1"}
    alerts = [
        {"labels": alert, "state": "firing"},
        {"labels": {**alert, "job": "producer"}, "state": "firing"},
        {"labels": {"alertname": "TasksStuck", "severity": "page"}, "state": "pending"},
    ]
    assert describe_prometheus("http://p", groups, alerts).splitlines() == [
        "http://p",
        "rules: 2 groups from alerts.yml, recording.yml: 2 alerting, 5 recording",
        "rules failing to evaluate: TasksStuck",
        "firing: DaemonDown consumer i:1; DaemonDown producer i:1",
        "pending: TasksStuck",
    ]
    assert describe_prometheus("http://p", [], []).splitlines()[1:] == [
        "rules: 0 groups from no file: 0 alerting, 0 recording",
        "firing: none",
        "pending: none",
    ]


def test_stop_order_and_stop_budgets(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL starts first and stops last (supervisord's shutdown stops programs in
    reverse priority, each after the one before); each daemon is told its stopwaitsecs
    (SUPERVISOR_STOPWAITSECS), so that a drain timeout it cannot honour is refused at
    start, and its default drain fits."""
    monkeypatch.setenv("EXTRA_CONSUMERS", "2")
    monkeypatch.setenv("EXTRA_PRODUCERS", "1")
    path = tmp_path / "supervisord.conf"
    path.write_text(supervisor_conf(root, local_db=True, prometheus=False, scaled=True))
    opts = ServerOptions()
    opts.configfile = str(path)
    opts.process_config(do_usage=False)
    procs = {p.name: p for g in opts.process_group_configs for p in g.process_configs}
    priority = {name: p.priority for name, p in procs.items()}
    assert priority["postgres"] < priority["migrate"] < priority["consumer"]
    assert priority["consumer"] < priority["producer"]
    settings = {"consumer": ConsumerSettings, "producer": ProducerSettings}
    for name, p in procs.items():
        daemon = name.split("_")[0]
        if daemon not in settings:
            continue
        assert p.environment and p.environment[STOPWAIT_ENV] == str(p.stopwaitsecs), name
        cls = settings[daemon]
        default = cls.model_fields["drain_timeout"].default
        assert default + cls.stop_overhead_s <= p.stopwaitsecs, name
