"""Real daemons as subprocesses on loopback (daemons.bench.private, which the bench uses
too), and a real supervisord running the bundle's own conf/supervisord.conf, for system
tests.

    bundle = Bundle(db_url, tmp_path)
    consumer = bundle.consumer(CONSUMER_RATE_LIMIT="100")
    producer = bundle.producer(PRODUCER_RATE="500")
    wait_until(lambda: states(db_url)["done"] >= 100, 30, "tasks done")
    assert producer.stop() == 0

and a real Prometheus on the bundle's own conf/prometheus.yml, scraping those daemons:

    with Prometheus(bundle, tmp_path) as prom:
        prom.query("up")
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from daemons.bench.ports import free_port
from daemons.bench.private import PrivateBundle
from daemons.bench.process import BIN, stop
from daemons.bench.process import wait_until as wait_until  # for the tests
from daemons.bench.scrape import Sample, scrape
from tests.conftest import ROOT, need, sql
from tests.rules import PROMETHEUS_CONF, rule_files

DASHBOARD = ROOT / "provisioning" / "grafana" / "dashboards" / "tasks.json"
# The targets conf/prometheus.yml scrapes (the daemons' default metrics ports).
DEFAULT_TARGETS = {"producer": "127.0.0.1:9101", "consumer": "127.0.0.1:9102"}


def _by_type(samples: list[Sample], count: str, total: str) -> dict[int, tuple[int, int]]:
    out: dict[int, list[int]] = {}
    for name, labels, value in samples:
        for i, wanted in enumerate((count, total)):
            if name == wanted:
                out.setdefault(int(labels["type"]), [0, 0])[i] = int(value)
    return {t: (n, s) for t, (n, s) in out.items() if n}


def done_by_type(metrics_url: str) -> dict[int, tuple[int, int]]:
    """{type: (tasks_done_total, tasks_value_sum_total)}: what this consumer process did
    since it started (counters start at zero in each process)."""
    return _by_type(scrape(metrics_url), "tasks_done_total", "tasks_value_sum_total")


def lifetime_by_type(metrics_url: str) -> dict[int, tuple[int, int]]:
    """{type: (tasks_done_in_db, tasks_value_sum_in_db)}: the database's lifetime totals
    as a daemon exports them (gauges, refreshed every 2 s)."""
    return _by_type(scrape(metrics_url), "tasks_done_in_db", "tasks_value_sum_in_db")


def db_done_by_type(db_url: str) -> dict[int, tuple[int, int]]:
    """{type: (count, value sum)} of done tasks in the database."""
    rows = sql(db_url, "SELECT type, count(*), sum(value) FROM tasks WHERE state='done' GROUP BY 1")
    return {int(t): (int(n), int(s)) for t, n, s in rows}  # type: ignore[call-overload]


def all_done_up_to(db_url: str, max_id: int) -> bool:
    query = "SELECT 1 FROM tasks WHERE id <= %s AND state <> 'done' LIMIT 1"
    return not sql(db_url, query, (max_id,))


def max_id(db_url: str) -> int:
    return int(sql(db_url, "SELECT coalesce(max(id), 0) FROM tasks")[0][0])  # type: ignore[arg-type]


# The daemons of one test: own ports, own working directory, one database.
Bundle = PrivateBundle


class Supervisor:
    """A real supervisord running the repository's conf/supervisord.conf (copied into
    `workdir/conf/` so that `%(here)s/../var` lands in the test's directory)."""

    def __init__(self, bundle: Bundle, **env: str) -> None:
        self.kills: dict[str, list[float]] = {}  # program: when a test SIGKILLed it
        self.in_flight: list[int] = []  # tasks in flight at each failure a test injected
        self.bundle = bundle
        root = bundle.workdir
        (root / "conf").mkdir(exist_ok=True)
        (root / "var" / "log").mkdir(parents=True, exist_ok=True)
        (root / "var" / "run").mkdir(parents=True, exist_ok=True)
        self.conf = root / "conf" / "supervisord.conf"
        shutil.copy(ROOT / "conf" / "supervisord.conf", self.conf)
        self.env = bundle.env(**env)
        self.popen = subprocess.Popen(
            [str(BIN / "supervisord"), "-n", "-c", str(self.conf)],
            env=self.env,
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: (root / "var" / "run" / "supervisor.sock").exists(), 20, "socket")

    def ctl(self, *args: str, check: bool = False) -> str:
        out = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"supervisorctl {args}: {out.stdout}{out.stderr}")
        return out.stdout + out.stderr

    def status(self) -> dict[str, str]:
        """{program: state}, e.g. {"consumer": "RUNNING"}."""
        out = {}
        for line in self.ctl("status").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
        return out

    def pid(self, program: str) -> int:
        return int(self.ctl("pid", program).strip())

    def log(self, program: str) -> str:
        path = self.bundle.workdir / "var" / "log" / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_running(self, *programs: str, timeout_s: float = 60) -> None:
        wait_until(
            lambda: all(self.status().get(p) == "RUNNING" for p in programs),
            timeout_s,
            f"{programs} RUNNING",
            every_s=0.3,
        )

    def close(self) -> None:
        if self.popen.poll() is None:
            self.ctl("shutdown")
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` and its key, as PEM files in `tmp`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def promtool(*args: str) -> str:
    """Run promtool in conf/ (where the rule files name each other); fail on an error."""
    binary = shutil.which("promtool")
    need(binary is not None, "promtool not installed (Debian package prometheus)")
    out = subprocess.run(
        [str(binary), *args],
        cwd=PROMETHEUS_CONF.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def render_prometheus(
    directory: Path, targets: dict[str, str], interval: str, for_: str | None = None
) -> Path:
    """conf/prometheus.yml with its targets and intervals replaced, nothing else, written
    into `directory` next to copies of the rule files it names (so that they resolve as
    in conf/). With `for_`, every alert's `for:` becomes that, so a test waits seconds."""
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
    for name in rule_files():
        rules = (PROMETHEUS_CONF.parent / name).read_text()
        if for_ is not None:
            rules = re.sub(r"^(\s*for:\s*)\S+", rf"\g<1>{for_}", rules, flags=re.M)
        (directory / name).write_text(rules)
    config = directory / "prometheus.yml"
    config.write_text(text)
    return config


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel of the Tasks dashboard."""
    out: list[tuple[str, str]] = []
    stack = list(json.loads(DASHBOARD.read_text())["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))  # rows
        out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
    return out


class Prometheus:
    """A real Prometheus server on conf/prometheus.yml rendered for a Bundle's ports
    (render_prometheus), in `workdir`, and its HTTP API. Started, it is ready and scrapes
    both daemons; `with` stops it."""

    def __init__(
        self, bundle: Bundle, workdir: Path, interval: str = "1s", for_: str | None = None
    ) -> None:
        binary = shutil.which("prometheus")
        need(binary is not None, "prometheus not installed (Debian package prometheus)")
        targets = {
            job: f"127.0.0.1:{bundle.ports[job.upper() + '_METRICS_PORT']}"
            for job in DEFAULT_TARGETS
        }
        config = render_prometheus(workdir, targets, interval, for_)
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # closed in close()
        self.base = f"http://127.0.0.1:{free_port()}"
        self.popen = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address={self.base.removeprefix('http://')}",
            ],
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: self.popen.poll() is not None or self.ready(),
                20,
                "prometheus ready",
                every_s=0.2,
            )
            assert self.popen.poll() is None, self.log_path.read_text()[-3000:]
            wait_until(
                lambda: self.targets_up() == {"producer": "up", "consumer": "up"},
                15,
                "both targets up",
                every_s=0.25,
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        stop(self.popen, timeout_s=15)
        self._log.close()

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
