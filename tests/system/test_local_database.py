"""The local database is not open to the machine (issue 16): every connection needs a
password, which only the bundle's owner can read; the daemons' role is no superuser
and still runs the whole pipeline, maintenance included; `make psql` and `make db_url`
keep working for the owner; a cluster made by an earlier version (trust) is converted
at its next start."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import psycopg
import pytest

from daemons import localdb
from daemons.bench.cluster import clean_env
from daemons.bench.process import stop
from tests.conftest import BIN, ROOT, free_port, need, sql, states
from tests.system.harness import Bundle, scrape, wait_until


def _port(url: str) -> int:
    return int(psycopg.conninfo.conninfo_to_dict(url)["port"])  # type: ignore[arg-type]


def _pgdata(url: str) -> Path:
    passfile = Path(psycopg.conninfo.conninfo_to_dict(url)["passfile"])  # type: ignore[arg-type]
    return passfile.with_name(passfile.name.removesuffix(".pgpass"))


def _connect_as(user: str, dsn: str) -> str:
    """Try to connect as system user `user` (a forked child that gave up root: the same
    libraries, another account). Returns 'connected' or the error."""
    entry = pwd.getpwnam(user)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            os.environ["HOME"] = entry.pw_dir
            with psycopg.connect(dsn, connect_timeout=5):
                result = "connected"
        except BaseException as exc:  # reported to the parent
            result = f"{type(exc).__name__}: {exc}"
        os.write(write, result.encode()[:4000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    return out


def test_another_account_cannot_connect_to_the_local_database(pg_server: str) -> None:
    need(os.geteuid() == 0, "switching to the `nobody` account needs root (CI runs as root)")
    port = _port(pg_server)
    passfile = localdb.passfile_for(_pgdata(pg_server))
    assert passfile.stat().st_mode & 0o077 == 0, "the password file is the owner's only"
    app = localdb.url_for(port, "tasks", localdb.APP_ROLE, passfile)
    owner = localdb.url_for(port, "tasks", localdb.OWNER_ROLE, passfile)
    attempts = {
        "the printed URL": app,
        "the superuser's URL": owner,
        "superuser, no password": f"postgresql://postgres@127.0.0.1:{port}/tasks",
        "daemons' role, no password": f"postgresql://tasks@127.0.0.1:{port}/postgres",
        "the Unix socket": f"host={_pgdata(pg_server) / 'run'} port={port} user=postgres",
    }
    for what, dsn in attempts.items():
        result = _connect_as("nobody", dsn)
        assert result != "connected", what
        assert "password" in result or "Permission denied" in result, (what, result)
    # The owner of the bundle, with the same URLs, gets in.
    assert _connect_as("root", app) == "connected"
    assert _connect_as("root", owner) == "connected"


def test_make_psql_and_make_db_url_work_for_the_owner(pg_server: str) -> None:
    env = clean_env(
        LOCALDB_PORT=str(_port(pg_server)), LOCALDB_DATA=str(_pgdata(pg_server)), MAKEFLAGS=""
    )
    url = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "db_url"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert url.returncode == 0, url.stderr
    assert url.stdout.strip().startswith("postgresql://tasks@127.0.0.1:")
    assert "passfile=" in url.stdout and ":" not in url.stdout.split("//")[1].split("@")[0]
    psql = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "psql"],
        env=env,
        input="SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert psql.returncode == 0, psql.stdout + psql.stderr
    assert "tasks" in psql.stdout and " f" in psql.stdout  # the daemons' role, no superuser


def test_the_daemons_run_as_their_role_with_maintenance(bundle: Bundle, app_db_url: str) -> None:
    bundle.db_url = app_db_url  # every daemon of this bundle connects as the daemons' role
    consumer = bundle.consumer(CONSUMER_WORK_SCALE="0", CONSUMER_MAINTENANCE_INTERVAL="0.5")
    producer = bundle.producer(PRODUCER_RATE="500", PRODUCER_MAINTENANCE_INTERVAL="0.5")
    wait_until(lambda: states(app_db_url)["done"] >= 500, 30, "tasks done as the daemons' role")

    def ahead() -> float:
        samples = scrape(bundle.metrics_url("consumer"))
        return max((v for n, _, v in samples if n == "tasks_partitions_ahead"), default=0)

    wait_until(ahead, 15, "partitions made ahead by maintenance")
    producer.terminate()
    assert producer.wait(20) == 0
    consumer.terminate()
    assert consumer.wait(30) == 0
    for proc in (consumer, producer):
        assert "maintenance_failing" not in proc.log() and "InsufficientPrivilege" not in proc.log()


def test_a_trust_cluster_of_an_earlier_version_is_converted(tmp_path: Path) -> None:
    """Made as before: initdb --auth=trust, migrated as the superuser (tables owned by
    postgres). The next start asks for passwords and says so; the next `migrator up`
    hands the tables to the daemons' role, and nothing stored is lost."""
    pgdata, port = tmp_path / "pgdata", free_port()
    pgdata.mkdir(mode=0o700)
    user = localdb._run_as()
    if user:
        localdb._prepare_for(user, pgdata)
    initdb = [
        str(localdb.bin_dir() / "initdb"),
        "-D",
        str(pgdata),
        "--auth=trust",
        "-U",
        "postgres",
    ]
    localdb._quiet_run([*initdb, "--no-instructions"], user, True)
    localdb._quiet_run(
        [str(localdb.bin_dir() / "postgres"), "--single", "-D", str(pgdata), "postgres"],
        user,
        True,
        stdin=b"CREATE DATABASE tasks;\n",
    )
    old_url = f"postgresql://postgres@127.0.0.1:{port}/tasks"
    (pgdata / "run").mkdir()
    if user:
        localdb._prepare_for(user, pgdata)
    server = subprocess.Popen(  # the old server itself, not `localdb run`, which converts
        localdb.server_argv(pgdata, port), **localdb._demote(user), stdout=subprocess.DEVNULL
    )
    assert localdb.wait_ready(old_url, 60)
    try:
        _migrator(clean_env(DATABASE_URL=old_url), tmp_path)
        sql(
            old_url,
            "INSERT INTO tasks (type, value, creation_time, last_update_time) VALUES (1, 1, 0, 0)",
        )
    finally:
        stop(server)
    server = _start(pgdata, port, tmp_path, expect_message=True)
    try:
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(old_url, connect_timeout=5).close()
        env = clean_env(LOCALDB_PORT=str(port), LOCALDB_DATA=str(pgdata))
        assert "schema_handed_over" in _migrator(env, tmp_path)
        app = localdb.url_for(port, passfile=localdb.passfile_for(pgdata))
        sql(
            app,
            "INSERT INTO tasks (type, value, creation_time, last_update_time) VALUES (2, 2, 0, 0)",
        )
        assert states(app)["received"] == 2
    finally:
        stop(server)


def _start(
    pgdata: Path, port: int, tmp: Path, expect_message: bool = False
) -> subprocess.Popen[bytes]:
    """The server as `make run` starts it (localdb run), in the foreground of a child."""
    proc = subprocess.Popen(
        [str(BIN / "localdb"), "run"],
        env=clean_env(LOCALDB_PORT=str(port), LOCALDB_DATA=str(pgdata)),
        cwd=tmp,
        stdout=open(tmp / "postgres.log", "ab"),  # the child keeps it
        stderr=subprocess.STDOUT,
    )
    url = localdb.url_for(port, role="postgres", passfile=localdb.passfile_for(pgdata))
    wait_until(lambda: proc.poll() is not None or localdb.wait_ready(url, 1), 60, "postgres up")
    log = (tmp / "postgres.log").read_text()
    assert proc.poll() is None, log
    assert ("now asks for one (scram-sha-256)" in log) == expect_message, log
    return proc


def _migrator(env: dict[str, str], cwd: Path) -> str:
    out = subprocess.run(
        [str(BIN / "migrator"), "up"], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr
