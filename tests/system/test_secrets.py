"""Passwords never printed (issue 16): each form of DATABASE_URL that carries one goes
through every place that prints a URL or an error about it: --explain of both daemons,
their start-up errors, the migrator's log and errors, and `make run`'s wait message
(`python -m daemons.bundle wait-flowing`)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from daemons.bench.cluster import clean_env
from tests.conftest import BIN, free_port

PW = "S3cr3t-pw_4711"


def forms(port: int, role: str, db: str) -> dict[str, str]:
    return {
        "user info": f"postgresql://{role}:{PW}@127.0.0.1:{port}/{db}",
        "query": f"postgresql://{role}@127.0.0.1:{port}/{db}?password={PW}",
    }


# Not accepted as DATABASE_URL (a settings error, exit 2), so never connects: its
# error must not show the password either. libpq's own errors can quote a password
# (`invalid percent-encoded token: "..."`): that one is redacted from the daemon's line.
REFUSED = {"keyword": f"host=127.0.0.1 port=1 user=tasks password={PW} dbname=tasks"}
MALFORMED = f"postgresql://tasks:{PW}%zz@127.0.0.1:1/tasks"


def run(argv: list[str], url: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=clean_env(DATABASE_URL=url, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_hidden(out: subprocess.CompletedProcess[str]) -> str:
    text = out.stdout + out.stderr
    assert PW not in text, text
    return text


@pytest.fixture
def secret_db(pg_server: str) -> Iterator[tuple[int, str, str]]:
    """A role with password PW owning an empty database: (port, role, database)."""
    role, db = f"r_{uuid.uuid4().hex[:8]}", f"s_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PW}'")
        conn.execute(f"CREATE DATABASE {db} OWNER {role}")
    port = psycopg.conninfo.conninfo_to_dict(pg_server).get("port") or "5432"
    yield int(port), role, db
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.parametrize("form", ["user info", "query"])
def test_a_password_in_the_url_is_never_printed(
    form: str, secret_db: tuple[int, str, str], tmp_path: Path
) -> None:
    port, role, db = secret_db
    url = forms(port, role, db)[form]
    for daemon in ("producer", "consumer"):
        explained = assert_hidden(run([str(BIN / daemon), "--explain"], url, tmp_path))
        assert f"{role}:***@" in explained or "password=***" in explained
    # The migrator's log names the database it migrated, masked.
    migrated = run([str(BIN / "migrator"), "up"], url, tmp_path)
    assert migrated.returncode == 0, assert_hidden(migrated)
    assert "migration_applied" in assert_hidden(migrated)
    assert "db=postgresql://" in migrated.stderr and "***" in migrated.stderr
    # make run's wait message.
    waited = run(
        [str(BIN / "python"), "-m", "daemons.bundle", "wait-flowing", "--tasks", "0"], url, tmp_path
    )
    assert waited.returncode == 0, assert_hidden(waited)
    assert "tasks flowing" in assert_hidden(waited) and "***" in waited.stdout
    # Start-up errors: the same URL on a port where nothing listens.
    dead = url.replace(f":{port}/", f":{free_port()}/")
    for argv in (
        [str(BIN / "consumer")],
        [str(BIN / "producer")],
        [str(BIN / "migrator"), "up", "--wait", "1"],
    ):
        out = run(
            argv, dead, tmp_path, CONSUMER_DB_CONNECT_TIMEOUT="1", PRODUCER_DB_CONNECT_TIMEOUT="1"
        )
        assert out.returncode == 3, assert_hidden(out)
        assert "not ready" in assert_hidden(out)


def test_refused_and_malformed_urls_do_not_print_the_password(tmp_path: Path) -> None:
    for daemon in ("producer", "consumer", "migrator"):
        argv = [str(BIN / daemon), *(["up"] if daemon == "migrator" else ["--explain"])]
        out = run(argv, REFUSED["keyword"], tmp_path)
        assert out.returncode == 2 and "DATABASE_URL" in assert_hidden(out)
        assert "password=***" in out.stderr
    for argv in ([str(BIN / "consumer")], [str(BIN / "migrator"), "up", "--wait", "1"]):
        out = run(argv, MALFORMED, tmp_path, CONSUMER_DB_CONNECT_TIMEOUT="1")
        assert out.returncode == 2, assert_hidden(out)
        assert "invalid DATABASE_URL" in assert_hidden(out)
