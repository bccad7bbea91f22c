"""The bundle as `make run` runs it, local PostgreSQL included, stopped as `make stop`
stops it: supervisord's own shutdown, in reverse priority, so the daemons drain while
the database still takes their writes (issue 15, item 5)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from daemons import localdb
from daemons.bundle import supervisor_conf
from tests.conftest import BIN, ROOT, free_port, states
from tests.system.harness import Bundle, wait_until


def _processing(db_url: str) -> int:
    try:
        return states(db_url)["processing"]
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):  # starting, migrating
        return 0


# Room for the teardown's own shutdown after a failed wait, so the report carries the
# logs (tests/conftest.py) instead of pytest-timeout's stack.
@pytest.mark.timeout(240)
def test_shutdown_stops_postgres_after_the_drained_daemons(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for sub in ("log", "run"):
        (tmp_path / "var" / sub).mkdir(parents=True)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(supervisor_conf(tmp_path, local_db=True, prometheus=False))
    # The data directory where an unprivileged user can reach it (CI runs as root).
    pgroot = Path(tempfile.mkdtemp(prefix="tasks-shutdown-pg-"))
    port = free_port()
    pgdata = pgroot / "pgdata"
    bundle = Bundle(
        localdb.url_for(port, "tasks", localdb.OWNER_ROLE, localdb.passfile_for(pgdata)),
        tmp_path,
    )
    env = bundle.env(
        LOCALDB_PORT=str(port),
        LOCALDB_DATA=str(pgdata),
        PRODUCER_RATE="600",
        CONSUMER_WORK_SCALE="100",  # 0-10 s of work: the drain has work to give back
        CONSUMER_MAX_IN_FLIGHT="5000",
        CONSUMER_DRAIN_TIMEOUT="2",
    )
    del env["DATABASE_URL"]  # the local database, as make run without DATABASE_URL
    sup = subprocess.Popen(
        [str(BIN / "supervisord"), "-n", "-c", str(conf)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "var" / "log"
    try:
        wait_until(lambda: _processing(bundle.db_url) >= 500, 60, "work in flight")
        out = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(conf), "shutdown"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        sup.wait(90)
    finally:
        if sup.poll() is None:  # the test failed early: still stop PostgreSQL with it
            subprocess.run(
                [str(BIN / "supervisorctl"), "-c", str(conf), "shutdown"],
                env=env,
                capture_output=True,
                timeout=30,
            )
            try:
                sup.wait(60)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait(10)
        shutil.rmtree(pgroot, ignore_errors=True)
    events = (log / "supervisord.log").read_text()
    order = [
        line.split("stopped: ")[1].split()[0] for line in events.splitlines() if "stopped: " in line
    ]
    assert order == ["producer", "consumer", "postgres"], events
    consumer = (log / "consumer.log").read_text()
    stopped = [line for line in consumer.splitlines() if " consumer_stopped " in line]
    assert stopped and "failure=none" in stopped[-1], consumer[-3000:]
    assert "released_to_received=0 " not in stopped[-1], stopped[-1]  # work was given back
    assert "drain_release_failed" not in consumer and "Traceback" not in consumer
    assert "exit status 0" in events.split("stopped: consumer")[1].splitlines()[0], events
