"""The bench's options, declared once: pydantic-settings builds the command line (flags
in kebab case, `--no-X` for the booleans that default on, help from the descriptions)
from this model, and validates it. Only the command line sets them: neither the
environment nor `.env` does (a stray `SECONDS` must not change a benchmark).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = {"zero": "0", "default": "1"}  # name -> CONSUMER_WORK_SCALE
SHARED_SETTINGS = ("TASKS_RETENTION",)  # read by both daemons under one name


class OptionsError(ValueError):
    """A bad command line: the message names the flag, the value and what is accepted."""


class Options(BaseSettings):
    model_config = SettingsConfigDict(
        cli_prog_name="python -m daemons.bench",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        frozen=True,
        extra="forbid",
    )

    seconds: float = Field(20.0, gt=0, description="measured window per workload")
    warmup: float = Field(5.0, ge=0, description="seconds before the window")
    workloads: list[str] = Field(
        ["zero", "default"],
        description=f"comma-separated of {', '.join(WORKLOADS)}; none = only the RPC figure",
    )
    ceiling_seconds: float = Field(5.0, ge=0, description="psycopg ceiling run (0 = skip)")
    rpc_seconds: float = Field(10.0, ge=0, description="single-task RPC window (0 = skip)")
    rpc_warmup: float = Field(2.0, ge=0, description="RPC warm-up seconds")
    rpc_concurrency: int = Field(32, ge=1, description="callers per generator")
    rpc_procs: int = Field(1, ge=1, description="generator processes (h2load: connections)")
    rpc_generator: Literal["auto", "h2load", "python"] = Field(
        "auto",
        description="RPC load generator: h2load (C, nghttp2-client) when on PATH, else"
        " daemons.bench.rpc_load (Python, grpc.aio)",
    )
    backlog: int = Field(20_000, ge=1, description="PRODUCER_MAX_BACKLOG")
    max_in_flight: int = Field(50_000, ge=1, description="CONSUMER_MAX_IN_FLIGHT")
    consumers: int = Field(1, ge=1, description="consumers (round_robin)")
    producers: int = Field(1, ge=1, description="producers on the database")
    # Read by split_set(), not by pydantic-settings: see there why.
    set: dict[str, str] = Field(
        {},
        description="VAR=VALUE: any other daemon setting, e.g. --set PRODUCER_BATCH_MAX=5000"
        " (repeatable)",
    )
    py_spy: bool = Field(
        False,
        description="record py-spy CPU profiles of both daemons over each window (perturbs"
        " figures)",
    )
    pg_stats: bool = Field(
        False,
        description="load pg_stat_statements in the private cluster; report the top statements",
    )
    half_rate: bool = Field(
        True,
        description="after each workload, run it again at half the rate it reached (the"
        " latency target's condition); off when --set PRODUCER_RATE fixes the rate",
    )
    minute_rows: bool = Field(
        False,
        description="print a row per minute of the window as it ends (tasks/s, p99 beyond the"
        " work, PostgreSQL CPU per 1k, database size) and chart them (make soak)",
    )
    row_seconds: float = Field(60.0, gt=0, description="length of a --minute-rows row (tests)")
    out: Path = Field(ROOT / "profiles", description="where charts go")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # CliApp puts the command line in front of it

    @field_validator("workloads")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        names = [w.strip() for w in value if w.strip() not in ("", "none")]
        bad = [w for w in names if w not in WORKLOADS]
        if bad:
            raise ValueError(f"unknown {bad}; accepted: {', '.join(WORKLOADS)} or none")
        return names

    @field_validator("set")
    @classmethod
    def _daemon_settings(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not (key.startswith(("PRODUCER_", "CONSUMER_")) or key in SHARED_SETTINGS):
                raise ValueError(
                    f"{key!r}: expected PRODUCER_*=VALUE, CONSUMER_*=VALUE or one of"
                    f" {', '.join(SHARED_SETTINGS)}"
                )
        return value

    @property
    def overrides(self) -> dict[str, str]:
        return self.set

    @property
    def runs_half_rate(self) -> bool:
        return self.half_rate and "PRODUCER_RATE" not in self.set

    @classmethod
    def parse(cls, argv: list[str]) -> Options:
        rest, settings = split_set(argv)
        try:
            return CliApp.run(cls, cli_args=rest, set=settings)
        except ValidationError as exc:
            err = exc.errors()[0]
            flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
            shown = err.get("input", "")
            raise OptionsError(f"{flag} {shown!r}: {err['msg']}") from None


def split_set(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take every `--set VAR=VALUE` (or `--set=VAR=VALUE`) out of argv.

    pydantic-settings cannot read this flag itself: for a list or dict field it splits
    every value at its commas (outside quotes), and daemon settings have commas in their
    values (`--set PRODUCER_CONSUMER_TARGET=ipv4:127.0.0.1:1,127.0.0.1:2`). The field is
    still declared, validated and shown in --help by the model above."""
    rest: list[str] = []
    settings: dict[str, str] = {}
    items = iter(argv)
    for arg in items:
        if arg == "--set":
            item = next(items, "")
        elif arg.startswith("--set="):
            item = arg.removeprefix("--set=")
        else:
            rest.append(arg)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionsError(f"--set {item!r}: expected VAR=VALUE")
        settings[key] = value
    return rest, settings
