"""Real daemons as subprocesses on loopback, and a real supervisord running the bundle's
own conf/supervisord.conf, for system tests.

    bundle = Bundle(db_url, tmp_path)
    consumer = bundle.consumer(CONSUMER_RATE_LIMIT="100")
    producer = bundle.producer(PRODUCER_RATE="500")
    wait_until(lambda: states(db_url)["done"] >= 100, 30, "tasks done")
    producer.terminate(); assert producer.wait(10) == 0
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BIN, ROOT, free_port, sql


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1) -> Any:
    """Poll `pred` until it returns something truthy; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for: {what} (last: {last!r})")


def scrape(metrics_url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a /metrics page: (name, labels, value)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _by_type(
    samples: list[tuple[str, dict[str, str], float]], count: str, total: str
) -> dict[int, tuple[int, int]]:
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


class Proc:
    """One daemon process with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = cwd / f"{name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # closed in wait() or kill()
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, event: str) -> list[dict[str, str]]:
        """Fields of every console log line with this event name."""
        out = []
        for line in self.log().splitlines():
            parts = line.split(" ", 4)
            if len(parts) >= 4 and parts[3] == event:
                out.append(dict(re.findall(r"(\w+)=(\S+)", parts[4] if len(parts) > 4 else "")))
        return out

    def wait_event(self, event: str, timeout_s: float = 30.0) -> dict[str, str]:
        found = wait_until(
            lambda: self.events(event) or self.popen.poll() is not None,
            timeout_s,
            f"{self.name} logs {event}",
        )
        if found is True:
            raise AssertionError(f"{self.name} exited before {event}:\n{self.log()[-3000:]}")
        return found[-1]  # type: ignore[no-any-return]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.popen.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 30.0) -> int:
        rc = self.popen.wait(timeout_s)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


class Bundle:
    """Daemons for one test: own ports, own working directory, one database."""

    def __init__(self, db_url: str, workdir: Path) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self.grpc_port = free_port()
        self.ports = {
            "PRODUCER_METRICS_PORT": free_port(),
            "PRODUCER_PROFILING_PORT": free_port(),
            "CONSUMER_METRICS_PORT": free_port(),
            "CONSUMER_PROFILING_PORT": free_port(),
        }
        self.procs: list[Proc] = []

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PRODUCER_", "CONSUMER_", "TASKS_")) and k != "DATABASE_URL"
        }
        env.update(
            {
                "DATABASE_URL": self.db_url,
                "CONSUMER_LISTEN": f"127.0.0.1:{self.grpc_port}",
                "PRODUCER_CONSUMER_TARGET": f"127.0.0.1:{self.grpc_port}",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                **{k: str(v) for k, v in self.ports.items()},
            }
        )
        env.update(overrides)
        return env

    def _start(self, name: str, overrides: dict[str, str]) -> Proc:
        proc = Proc(name, [str(BIN / name)], self.env(**overrides), self.workdir)
        self.procs.append(proc)
        return proc

    def consumer(self, **env: str) -> Proc:
        proc = self._start("consumer", env)
        proc.wait_event("consumer_started")
        return proc

    def producer(self, **env: str) -> Proc:
        proc = self._start("producer", env)
        proc.wait_event("producer_started")
        return proc

    def metrics_url(self, daemon: str) -> str:
        return f"http://127.0.0.1:{self.ports[daemon.upper() + '_METRICS_PORT']}/metrics"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


class Supervisor:
    """A real supervisord running the repository's conf/supervisord.conf (copied into
    `workdir/conf/` so that `%(here)s/../var` lands in the test's directory)."""

    def __init__(self, bundle: Bundle, **env: str) -> None:
        self.kills: list[float] = []  # when a test SIGKILLed one of its programs
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
