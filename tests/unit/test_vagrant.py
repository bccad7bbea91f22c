"""The VM's provisioning, read as files (no tool is run here): every provisioning script
is strict and executable, every repository file the scripts name exists, and Grafana's
provisioning agrees with the dashboard and with check.sh. What needs vagrant, ruby, bash,
shellcheck, supervisor, the daemons or a server is in tests/system/test_vm_provisioning.py.
"""

from __future__ import annotations

import configparser
import json
import os
import re

from tests.conftest import ROOT, need
from tests.vm_files import GRAFANA, GUEST_PORTS, PROV, SCRIPTS, VM_DIR, assignment, yaml_values


def test_scripts_are_strict_and_executable() -> None:
    for script in SCRIPTS:
        text = script.read_text()
        if script.name == "lib.sh":  # sourced by the others
            assert text.startswith("# shellcheck shell=bash")
            continue
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "\nset -euo pipefail\n" in text, script
        assert os.access(script, os.X_OK), f"{script} is not executable"
    stages = sorted(p.name for p in PROV.glob("[0-9][0-9]-*.sh"))
    assert stages == [
        "10-base.sh",
        "20-postgres.sh",
        "30-app.sh",
        "40-prometheus.sh",
        "50-grafana.sh",
        "60-pgadmin.sh",
    ]
    for stage in stages:
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"' in (PROV / stage).read_text()


def test_every_repository_file_the_scripts_name_exists() -> None:
    """Scripts name repository files only through these variables, so all are found."""
    roots = {"TASKS_SRC": ROOT, "VM_DIR": VM_DIR, "GRAFANA_SRC": GRAFANA}
    ref = re.compile(r"\$\{?(TASKS_SRC|VM_DIR|GRAFANA_SRC)\}?\"?(/[\w.*/\[\]${}-]+)")
    checked = set()
    for script in SCRIPTS:
        text = script.read_text()
        consts = dict(re.findall(r"^([A-Z_]+)=([\w./-]+)$", text, re.M))
        for var, tail in ref.findall(text):
            path = tail
            for name, value in consts.items():
                path = re.sub(rf"\$\{{?{name}\}}?(?!\w)", value, path)
            assert "$" not in path, f"{script.name}: cannot resolve {var}{tail}"
            matches = list(roots[var].glob(path.lstrip("/"))) if path.strip("/") else [ROOT]
            assert matches, f"{script.name} names {var}{tail}, which does not exist"
            checked.add(f"{var}{path}")
    # The ones that matter most are among them.
    for expected in (
        "TASKS_SRC/provisioning/render-supervisor.sh",
        "TASKS_SRC/provisioning/[0-9][0-9]-*.sh",
        "GRAFANA_SRC/datasources/*.yml",
        "GRAFANA_SRC/dashboards/dashboards.yml",
        "GRAFANA_SRC/dashboards/*.json",
        "VM_DIR/tasks.env",
        "VM_DIR/grafana.ini",
        "VM_DIR/prometheus.default",
        "VM_DIR/supervisorctl",
        "VM_DIR/tasks-supervisord.service",
        "VM_DIR/pgadmin/pgadmin4.service",
        "VM_DIR/pgadmin/config_system.py",
    ):
        assert expected in checked, f"{expected} not among {sorted(checked)}"


def test_grafana_provisioning_agrees_with_the_dashboard_and_check() -> None:
    datasources = sorted((GRAFANA / "datasources").glob("*.yml"))
    provider = GRAFANA / "dashboards" / "dashboards.yml"
    need(
        bool(datasources) and provider.exists() and (GRAFANA / "dashboards/tasks.json").exists(),
        "provisioning/grafana/ (datasource, dashboard provider, tasks.json)",
    )
    uids = [u for ds in datasources for u in yaml_values(ds.read_text(), "uid")]
    check_uid = assignment(PROV / "check.sh", "DATASOURCE_UID")
    assert check_uid in uids
    url = [u for ds in datasources for u in yaml_values(ds.read_text(), "url")]
    assert url == ["http://127.0.0.1:9090"], "Prometheus in the VM"

    dashboard = json.loads((GRAFANA / "dashboards" / "tasks.json").read_text())
    assert dashboard["uid"] == assignment(PROV / "check.sh", "DASHBOARD_UID")
    assert dashboard["title"] == "Tasks"
    used = set(re.findall(r'"uid":\s*"([^"]+)"', json.dumps(dashboard.get("panels", []))))
    assert used <= {check_uid, "-- Grafana --"}, used

    # The file provider reads where 50-grafana.sh installs the JSON, and the home
    # dashboard is the Tasks dashboard there.
    (dashboards_dir,) = yaml_values(provider.read_text(), "path")
    assert assignment(PROV / "50-grafana.sh", "DASHBOARDS_DIR") == dashboards_dir
    ini = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    ini.read(VM_DIR / "grafana.ini")
    assert ini["dashboards"]["default_home_dashboard_path"] == f"{dashboards_dir}/tasks.json"
    assert ini["server"]["http_port"] == str(GUEST_PORTS["grafana"])
    assert ini["paths"]["provisioning"] == "/etc/grafana/provisioning"
