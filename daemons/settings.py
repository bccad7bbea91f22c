"""Settings: one frozen object per daemon, from the environment and a `.env` file.

An invalid value is reported as one line naming the variable, the value and what is
accepted (`SettingsError`); the CLI turns it into exit status 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

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


class _Common(BaseSettings):
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

    @model_validator(mode="after")
    def _shift_ports(self) -> Any:
        """Instance N of a scaled-out bundle (supervisor numprocs) gets its own ports;
        the values shown by --explain are the shifted, effective ones."""
        if self.instance:
            for name in ("metrics_port", "profiling_port"):
                port = getattr(self, name, 0)
                if port:
                    object.__setattr__(self, name, port + 10 * self.instance)
            listen = getattr(self, "listen", None)
            if listen:
                host, _, port = listen.rpartition(":")
                object.__setattr__(self, "listen", f"{host}:{int(port) + self.instance}")
        return self

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


S = TypeVar("S", bound=_Common)


class ProducerSettings(_Common):
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


class ConsumerSettings(_Common):
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

    @model_validator(mode="after")
    def _tls_pair(self) -> ConsumerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("CONSUMER_TLS_CERT and CONSUMER_TLS_KEY go together")
        return self


def env_name(cls: type[_Common], field: str) -> str:
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
            raise SettingsError(f"invalid settings: {_accepted(err)}") from None
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


_PASSWORD_PARAM = re.compile(r"(?i)(\bpassword=)[^&\s]*")


def mask(name: str, value: str) -> str:
    """Hide passwords: URLs lose their password (in the user info and in a `password=`
    parameter, which libpq accepts too), secret-looking names lose the value."""
    if "://" in value:
        parts = urlsplit(value)
        if parts.password:
            netloc = f"{parts.username}:***@{parts.hostname}"
            if parts.port:
                netloc += f":{parts.port}"
            parts = parts._replace(netloc=netloc)
        if parts.query:
            parts = parts._replace(query=_PASSWORD_PARAM.sub(r"\1***", parts.query))
        return urlunsplit(parts)
    if any(s in name.upper() for s in ("PASSWORD", "SECRET", "TOKEN")):
        return "***"
    return _PASSWORD_PARAM.sub(r"\1***", value)  # a keyword DSN: host=... password=...


def explain(settings: _Common) -> str:
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

# Shared: PostgreSQL URL. Unset = the local embedded database that `make run` starts
# (postgresql://postgres@127.0.0.1:$LOCALDB_PORT/tasks).
# DATABASE_URL=postgresql://user:password@host:5432/tasks

# Local embedded database (make run, when DATABASE_URL is unset)
# LOCALDB_PORT=54329
# LOCALDB_DATA=var/pgdata
"""


def _shared(cls: type[_Common], field: str) -> bool:
    """Read under one name by every daemon (DATABASE_URL, TASKS_RETENTION)."""
    return isinstance(cls.model_fields[field].validation_alias, AliasChoices)


def render_env_example() -> str:
    lines = [ENV_EXAMPLE_HEAD, "# --- Shared ---"]
    for field, info in _Common.model_fields.items():
        if _shared(_Common, field) and field != "database_url":
            lines.append(f"# {info.description}")
            lines.append(f"# {env_name(_Common, field)}={info.default}")
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
