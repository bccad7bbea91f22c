"""Settings: one frozen object per daemon, from the environment and a `.env` file.

An invalid value is reported as one line naming the variable, the value and what is
accepted (`SettingsError`); the CLI turns it into exit status 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import unquote

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    Field,
    FilePath,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemons.errors import SettingsError
from daemons.tokens import tokens_from

ENV_FILE = ".env"
LOCAL_HOST = "127.0.0.1"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["console", "json"]


# A day: long enough to look at yesterday's tasks, and it bounds the disk to about a
# day of production (about 0.7 GB at the default 100 tasks/s). River keeps a day too.
DEFAULT_RETENTION_S = 86400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90' or '90s', '30m', '24h', '7d' -> seconds."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError("a duration: seconds, or a number with s, m, h or d (24h, 7d); 0 = off")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _port(default: int, what: str) -> Any:
    return Field(default, ge=0, le=65535, description=f"{what} port on HTTP_HOST (0 = off)")


# Set by conf/supervisord.conf next to each daemon's stopwaitsecs, to the same value
# (a unit test keeps them equal): supervisor SIGKILLs a daemon still draining after it.
STOPWAIT_ENV = "SUPERVISOR_STOPWAITSECS"


class CommonSettings(BaseSettings):
    """Settings both daemons share (each under its own prefix, except DATABASE_URL)."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILE, extra="ignore", frozen=True, case_sensitive=False
    )
    prefix: ClassVar[str] = ""
    # What a graceful stop takes beyond the drain timeout (closing the pool, 5 s, and
    # for the consumer the RPC grace and the final flush): must fit in stopwaitsecs too.
    stop_overhead_s: ClassVar[float] = 5.0

    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL"),
        description="PostgreSQL URL; unset = the local embedded database (make run)",
    )
    tasks_retention: float = Field(
        DEFAULT_RETENTION_S,
        ge=0,
        validation_alias=AliasChoices("TASKS_RETENTION"),
        description="keep done tasks this long, then drop them by whole partitions"
        " (seconds, or 90s, 30m, 24h, 7d; 0 = keep everything)",
    )
    maintenance_interval: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="seconds between maintenance passes: partitions ahead, retention,"
        " vacuum of unfinished tasks (any number of daemons may run it; 0 = not this one)",
    )
    db_pool_size: int = Field(4, ge=1, le=100, description="database connections in the pool")
    db_connect_timeout: float = Field(
        60.0, gt=0, description="seconds to wait for the database at start-up before giving up"
    )
    db_statement_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="seconds a statement may run before PostgreSQL cancels it (a transient"
        " error, retried); no reply 5 s after that drops the connection as silent",
    )
    db_lock_timeout: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="seconds a statement waits for a lock before giving up and retrying,"
        " so a transaction held open elsewhere cannot stop the pipeline",
    )
    http_host: str = Field(LOCAL_HOST, description="address the metrics and profiling ports bind")
    # --- side ports held to account (issue 16) ---
    http_read_timeout: float = Field(
        5.0,
        gt=0,
        le=300,
        description="seconds a metrics/profiling connection may take to send its request"
        " (then it is closed)",
    )
    http_max_connections: int = Field(
        64,
        ge=1,
        le=10_000,
        description="metrics/profiling connections served at once per port (more get 503)",
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    log_format: LogFormat = Field("console", description="console (key=value) or json")
    drain_timeout: float = Field(
        10.0, gt=0, le=3600, description="seconds a graceful stop may take to drain"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="uvloop (measured: +10 % single-task RPCs/s) or the standard asyncio loop",
    )
    gc_threshold: int = Field(
        50_000,
        ge=0,
        description="young-generation GC threshold after gc.freeze() (0 = Python's defaults)",
    )
    instance: int = Field(
        0,
        ge=0,
        le=99,
        description="N-th of several on one host: ports shift by N (gRPC) and 10*N (HTTP)",
    )

    @model_validator(mode="before")
    @classmethod
    def _shift_ports(cls, data: Any) -> Any:
        """Instance N of a scaled-out bundle (supervisor numprocs) gets its own ports;
        the values shown by --explain are the shifted, effective ones. Shifted in the
        input, before validation: the model stays frozen and the bounds of a port apply
        to the port it will bind. Values that are not numbers are left to the fields'
        own validation, which names them."""
        instance = str(data.get("instance", "0")).strip() if isinstance(data, dict) else ""
        if not instance.isdigit() or not int(instance):
            return data
        shifted = dict(data)
        for name, step in (("metrics_port", 10), ("profiling_port", 10), ("listen", 1)):
            if name in cls.model_fields:
                value = str(data.get(name, cls.model_fields[name].default))
                host, colon, port = value.rpartition(":")
                if port.isdigit() and int(port):
                    shifted[name] = f"{host}{colon}{int(port) + step * int(instance)}"
        return shifted

    @field_validator("drain_timeout")
    @classmethod
    def _fits_supervisor(cls, value: float) -> float:
        """Under supervisor, a drain longer than its stopwaitsecs ends in SIGKILL: refused
        at start instead."""
        stopwait = os.environ.get(STOPWAIT_ENV, "")
        if stopwait and value + cls.stop_overhead_s > float(stopwait):
            raise ValueError(
                f"at most {float(stopwait) - cls.stop_overhead_s:g} s under supervisor, whose"
                f" stopwaitsecs={stopwait} must cover the drain and {cls.stop_overhead_s:g} s"
                " of stopping; raise stopwaitsecs (and SUPERVISOR_STOPWAITSECS beside it)"
                " in conf/supervisord.conf first"
            )
        return value

    @field_validator("tasks_retention", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("expected a postgresql:// URL")
        return value or None

    def store_options(self) -> dict[str, float]:
        """What daemons.store.Store takes from the settings besides the URL."""
        return {
            "statement_timeout_s": self.db_statement_timeout,
            "lock_timeout_s": self.db_lock_timeout,
        }

    def dsn(self) -> str:
        from daemons import localdb

        return self.database_url or localdb.default_url()


S = TypeVar("S", bound=CommonSettings)


class ProducerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="PRODUCER_")
    prefix: ClassVar[str] = "PRODUCER_"

    rate: float = Field(100.0, gt=0, le=1_000_000, description="tasks generated per second")
    max_backlog: int = Field(
        1000, ge=1, description="pause while this many tasks are not done (global, from the db)"
    )
    total: int = Field(
        0, ge=0, description="stop after this many tasks; exit 0 once all are done (0 = never)"
    )
    consumer_target: str = Field(
        "127.0.0.1:50051",
        min_length=1,
        description="gRPC target of the consumer(s): host:port, ipv4:a:p,b:p or dns:///name:port",
    )
    batch_max: int = Field(1000, ge=1, le=10_000, description="most tasks in one insert and RPC")
    max_concurrent_sends: int = Field(4, ge=1, le=256, description="batch RPCs in flight at once")
    send_timeout: float = Field(5.0, gt=0, description="deadline of one batch RPC, seconds")
    retry_backoff_max: float = Field(
        2.0, gt=0, description="longest wait before resending refused tasks, seconds"
    )
    redeliver_after: float = Field(
        10.0, gt=0, description="resend `received` tasks untouched for this many seconds"
    )
    lease_timeout: float = Field(
        30.0, gt=0, description="reclaim `processing` tasks untouched for this many seconds"
    )
    sweep_interval: float = Field(2.0, gt=0, description="seconds between redelivery sweeps")
    drain_timeout: float = Field(
        5.0, gt=0, le=3600, description="seconds a graceful stop waits for in-flight sends"
    )
    metrics_port: int = _port(9101, "Prometheus /metrics")
    profiling_port: int = _port(6061, "/debug/tasks dump")
    tls_ca: FilePath | None = Field(
        None,
        description="PEM CA that signed the consumer's certificate: use TLS (unset = plaintext)",
    )
    tls_server_name: str | None = Field(
        None, description="expected name in the consumer's certificate (default: the target host)"
    )
    # --- authenticated submitter (issue 16) ---
    auth_token: str | None = Field(
        None, description="bearer token sent with every RPC (the consumer's CONSUMER_AUTH_TOKENS)"
    )
    tls_cert: FilePath | None = Field(
        None,
        description="PEM client certificate for a consumer that wants one"
        " (CONSUMER_TLS_CLIENT_CA; needs PRODUCER_TLS_KEY and PRODUCER_TLS_CA)",
    )
    tls_key: FilePath | None = Field(None, description="PEM private key of PRODUCER_TLS_CERT")

    @model_validator(mode="after")
    def _client_certificate(self) -> ProducerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("PRODUCER_TLS_CERT and PRODUCER_TLS_KEY go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError(
                "PRODUCER_TLS_CERT needs PRODUCER_TLS_CA (a client certificate is TLS)"
            )
        return self


class ConsumerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="CONSUMER_")
    prefix: ClassVar[str] = "CONSUMER_"
    # RPC grace (2 s), flush of finished work (5 s), closing the pool (5 s).
    stop_overhead_s: ClassVar[float] = 12.0

    listen: str = Field(
        "127.0.0.1:50051", pattern=r"^.+:\d{1,5}$", description="gRPC listen address host:port"
    )
    rate_limit: int = Field(
        1000, ge=1, description="tasks admitted per CONSUMER_RATE_PERIOD (all callers together)"
    )
    rate_period: float = Field(1.0, gt=0, le=86400, description="limiter window, seconds")
    max_in_flight: int = Field(1000, ge=1, le=1_000_000, description="tasks worked at once")
    max_batch: int = Field(10_000, ge=1, description="most tasks accepted in one batch RPC")
    work_scale: float = Field(
        1.0, ge=0, description="multiplier on `value` ms of work (0 = no wait; benchmarks)"
    )
    metrics_port: int = _port(9102, "Prometheus /metrics")
    profiling_port: int = _port(6062, "/debug/tasks dump")
    max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="largest request accepted, bytes (bigger ones get RESOURCE_EXHAUSTED)",
    )
    tls_cert: FilePath | None = Field(
        None, description="PEM certificate: serve TLS only (needs CONSUMER_TLS_KEY)"
    )
    tls_key: FilePath | None = Field(None, description="PEM private key of CONSUMER_TLS_CERT")
    reflection: bool = Field(
        True, description="serve gRPC server reflection (grpcurl list/describe need it)"
    )
    # The consumer sweeps too, so no task is stranded once every producer has exited:
    # later than the producer's by default, which sends, so a running producer comes first.
    sweep_interval: float = Field(
        5.0, ge=0, description="seconds between the consumer's own sweeps (0 = none)"
    )
    lease_timeout: float = Field(
        60.0, gt=0, description="reclaim and work `processing` tasks untouched this long"
    )
    redeliver_after: float = Field(
        30.0, gt=0, description="claim and work `received` tasks untouched this long"
    )
    # --- authenticated submitters (issue 16) ---
    auth_tokens: str | None = Field(
        None,
        description="bearer tokens, comma-separated, each `name:token` or `token`: every RPC"
        " but health must carry one (unset = no tokens)",
    )
    auth_token_file: FilePath | None = Field(
        None, description="file of tokens, one `name:token` or `token` a line (# comments)"
    )
    tls_client_ca: FilePath | None = Field(
        None,
        description="PEM CA of client certificates: mutual TLS, a client without one is"
        " refused (needs CONSUMER_TLS_CERT)",
    )
    insecure_listen: bool = Field(
        False,
        description="allow a CONSUMER_LISTEN other hosts can reach with neither TLS nor"
        " tokens (anyone could submit)",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ConsumerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("CONSUMER_TLS_CERT and CONSUMER_TLS_KEY go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("CONSUMER_TLS_CLIENT_CA needs CONSUMER_TLS_CERT and CONSUMER_TLS_KEY")
        host = self.listen.rpartition(":")[0].strip("[]")
        if not (_loopback(host) or self.tls_cert or self.tokens() or self.insecure_listen):
            raise ValueError(
                f"CONSUMER_LISTEN={self.listen} can be reached from other hosts, with neither"
                " TLS nor tokens: set CONSUMER_TLS_CERT/KEY (and CONSUMER_TLS_CLIENT_CA) or"
                " CONSUMER_AUTH_TOKENS, listen on 127.0.0.1, or CONSUMER_INSECURE_LISTEN=true"
            )
        return self

    def tokens(self) -> dict[str, str]:
        """{token: caller name} of every configured token (read when asked: at load, by
        the validator above, which reports a bad entry, and at start-up)."""
        return tokens_from(self.auth_tokens, self.auth_token_file)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or a wildcard: reachable unless proven otherwise


def env_name(cls: type[CommonSettings], field: str) -> str:
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"{cls.prefix}{field}".upper()


def load(cls: type[S]) -> S:
    """Build the settings or raise SettingsError naming the first bad variable."""
    try:
        return cls()
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a rule across several settings
            rule = _accepted(err).removeprefix("accepted: ")
            raise SettingsError(f"invalid settings: {rule[0].upper()}{rule[1:]}") from None
        field = str(err["loc"][0])
        name = env_name(cls, field) if field in cls.model_fields else field.upper()
        shown = mask(name, str(err.get("input", "")))
        raise SettingsError(f"invalid {name}={shown!r}: {_accepted(err)}") from None


def _accepted(err: Any) -> str:
    msg = str(err["msg"])
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"accepted values: {ctx['expected']}"
    if msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    return f"accepted: {msg[0].lower()}{msg[1:]}"


# --- passwords never printed (issue 16) ---
# libpq takes a password in the URL's user info (`user:pw@`), as a query parameter
# (`?password=pw`, its key maybe percent-encoded) and in a keyword string
# (`password=pw` or `password = 'p w'`). Masking errs on the side of hiding more.
_KEYWORD_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<rest>.*)$", re.DOTALL)
MASK = "***"


def _split_url(value: str) -> tuple[str, str, str, str] | None:
    """(scheme://, user info, host-and-path, ?query) of a URL, or None."""
    match = _URL.match(value)
    if not match:
        return None
    rest = match["rest"]
    head, sep, query = rest.partition("?")
    userinfo, at, hostpath = head.rpartition("@")  # the last @: a stray one is hidden too
    if not at:
        userinfo, hostpath = "", head
    return match["scheme"], userinfo, hostpath, sep + query


def _query_password(param: str) -> bool:
    return unquote(param.partition("=")[0]).strip().lower() == "password"


def mask(name: str, value: str) -> str:
    """Hide passwords: URLs lose the password of their user info and of a `password`
    parameter; keyword strings their `password=` value; secret-looking names the value."""
    url = _split_url(value)
    if url is not None:
        scheme, userinfo, hostpath, query = url
        if ":" in userinfo:
            userinfo = userinfo.partition(":")[0] + ":" + MASK
        params = [
            p.partition("=")[0] + "=" + MASK if _query_password(p) else p
            for p in query[1:].split("&")
        ]
        query = "?" + "&".join(params) if query else ""
        return scheme + (userinfo + "@" if userinfo else "") + hostpath + query
    secret_name = any(s in name.upper() for s in ("PASSWORD", "SECRET", "TOKEN"))
    if secret_name and not name.upper().endswith("_FILE") and value != "None":
        return MASK
    return _KEYWORD_PASSWORD.sub(r"\1" + MASK, value)  # a keyword DSN: host=... password=...


def secrets_in(dsn: str) -> set[str]:
    """The passwords a URL or keyword string carries, as written and decoded: what must
    not appear in any line printed about it (logs.redact)."""
    found: set[str] = set()
    url = _split_url(dsn)
    if url is not None:
        _, userinfo, _, query = url
        if ":" in userinfo:
            found.add(userinfo.partition(":")[2])
        found.update(p.partition("=")[2] for p in query[1:].split("&") if _query_password(p))
    else:
        for match in _KEYWORD_PASSWORD.finditer(dsn):
            raw = match.group(2)
            found.add(raw)
            if raw.startswith("'"):
                found.add(re.sub(r"\\(.)", r"\1", raw.strip("'")))
    found |= {unquote(s) for s in found}
    return {s for s in found if s}


def explain(settings: CommonSettings) -> str:
    """Every setting: variable, effective value, source and meaning; secrets masked."""
    cls = type(settings)
    dotenv = (
        {k.upper(): v for k, v in dotenv_values(ENV_FILE).items()}
        if Path(ENV_FILE).is_file()
        else {}
    )
    environ = {k.upper() for k in os.environ}
    rows = []
    for field, info in cls.model_fields.items():
        name = env_name(cls, field)
        value = getattr(settings, field)
        if field == "database_url" and value is None:
            value = f"(local) {settings.dsn()}"
        source = "environment" if name in environ else ".env" if name in dotenv else "default"
        rows.append((name, mask(name, str(value)), source, info.description or ""))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"{'VARIABLE'.ljust(width)}  {'VALUE'.ljust(vwidth)}  {'SOURCE':11}  MEANING"]
    lines += [f"{n.ljust(width)}  {v.ljust(vwidth)}  {s:11}  {d}" for n, v, s, d in rows]
    return "\n".join(lines)


ENV_EXAMPLE_HEAD = """\
# Every setting of the daemons, with its default and meaning. Copy to .env (read from
# the working directory) or export in the environment; the environment wins over .env.
# `producer --explain` / `consumer --explain` show the effective values and their source.
# Generated by `python -m daemons.settings > conf/env.example`; a test keeps it in sync.

# Shared: PostgreSQL URL. Unset = the local embedded database that `make run` starts,
# as the daemons' role, its password in a file only you can read
# (postgresql://tasks@127.0.0.1:$LOCALDB_PORT/tasks?passfile=$LOCALDB_DATA.pgpass).
# DATABASE_URL=postgresql://user:password@host:5432/tasks

# Local embedded database (make run, when DATABASE_URL is unset)
# LOCALDB_PORT=54329
# LOCALDB_DATA=var/pgdata

# Migrator: the role it connects as may own more than the daemons' (default:
# DATABASE_URL; both unset = the local database's superuser, postgres), and it makes
# the daemons' role owner of the tables (default: the local database's `tasks`).
# MIGRATOR_DATABASE_URL=postgresql://owner:password@host:5432/tasks
# MIGRATOR_APP_ROLE=tasks
"""


def _shared(cls: type[CommonSettings], field: str) -> bool:
    """Read under one name by every daemon (DATABASE_URL, TASKS_RETENTION)."""
    return isinstance(cls.model_fields[field].validation_alias, AliasChoices)


def render_env_example() -> str:
    lines = [ENV_EXAMPLE_HEAD, "# --- Shared ---"]
    for field, info in CommonSettings.model_fields.items():
        if _shared(CommonSettings, field) and field != "database_url":
            lines.append(f"# {info.description}")
            lines.append(f"# {env_name(CommonSettings, field)}={info.default}")
    lines.append("")
    for cls, title in ((ProducerSettings, "Producer"), (ConsumerSettings, "Consumer")):
        lines.append(f"# --- {title} ---")
        for field, info in cls.model_fields.items():
            if not _shared(cls, field):
                lines.append(f"# {info.description}")
                lines.append(f"# {env_name(cls, field)}={info.default}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_env_example(), end="")
