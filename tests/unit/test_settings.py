import pytest

from daemons.errors import SettingsError
from daemons.settings import (
    STOPWAIT_ENV,
    ConsumerSettings,
    ProducerSettings,
    explain,
    load,
    mask,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    for key in list(os.environ):
        if key.startswith(("PRODUCER_", "CONSUMER_")) or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_match_the_documented_ones() -> None:
    p, c = load(ProducerSettings), load(ConsumerSettings)
    assert c.listen == "127.0.0.1:50051"
    assert p.consumer_target == "127.0.0.1:50051"
    assert (p.metrics_port, c.metrics_port) == (9101, 9102)
    assert (p.profiling_port, c.profiling_port) == (6061, 6062)
    assert p.http_host == c.http_host == "127.0.0.1"
    assert c.reflection  # the port binds loopback: grpcurl works out of the box
    assert p.database_url is None and p.dsn().startswith("postgresql://")


@pytest.mark.parametrize(
    ("var", "value", "accepted"),
    [
        ("PRODUCER_RATE", "abc", "number"),
        ("PRODUCER_RATE", "0", "greater than 0"),
        ("PRODUCER_MAX_BACKLOG", "-1", "greater than or equal to 1"),
        ("PRODUCER_LOG_FORMAT", "xml", "'console' or 'json'"),
        ("PRODUCER_LOG_LEVEL", "loud", "DEBUG"),
        ("DATABASE_URL", "mysql://x", "postgresql://"),
    ],
)
def test_bad_value_names_variable_value_and_accepted(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, accepted: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load(ProducerSettings)
    msg = str(err.value)
    assert var in msg and repr(value.upper() if var.endswith("LEVEL") else value) in msg
    assert accepted in msg
    assert "\n" not in msg


def test_consumer_listen_needs_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUMER_LISTEN", "localhost")
    with pytest.raises(SettingsError, match="CONSUMER_LISTEN"):
        load(ConsumerSettings)


def test_dotenv_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / ".env").write_text("PRODUCER_RATE=42\nPRODUCER_TOTAL=7\n")
    monkeypatch.setenv("PRODUCER_TOTAL", "9")
    s = load(ProducerSettings)
    assert (s.rate, s.total) == (42.0, 9)
    text = explain(s)
    rate_line = next(line for line in text.splitlines() if line.startswith("PRODUCER_RATE "))
    total_line = next(line for line in text.splitlines() if line.startswith("PRODUCER_TOTAL "))
    assert ".env" in rate_line and "42" in rate_line
    assert "environment" in total_line
    assert "default" in next(x for x in text.splitlines() if x.startswith("PRODUCER_MAX_BACKLOG"))


def test_explain_masks_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret@db.example:5432/tasks")
    text = explain(load(ConsumerSettings))
    assert "s3cret" not in text
    assert "postgresql://app:***@db.example:5432/tasks" in text
    assert mask("X", "postgresql://u@h/d") == "postgresql://u@h/d"
    # libpq also takes the password as a parameter, or in a keyword DSN.
    assert mask("URL", "postgresql://u@h:5432/d?sslmode=require&password=hunter2") == (
        "postgresql://u@h:5432/d?sslmode=require&password=***"
    )
    assert "hunter2" not in mask("URL", "postgresql://u@h/d?PASSWORD=hunter2")
    assert mask("DSN", "host=h user=u password=hunter2 dbname=d") == (
        "host=h user=u password=*** dbname=d"
    )
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example/tasks?password=hunter2")
    assert "hunter2" not in explain(load(ConsumerSettings))


def test_env_example_lists_every_setting_with_its_default() -> None:
    from pathlib import Path

    from daemons.settings import env_name, render_env_example

    text = (Path(__file__).resolve().parents[2] / "conf" / "env.example").read_text()
    assert text == render_env_example(), "run: python -m daemons.settings > conf/env.example"
    for cls in (ProducerSettings, ConsumerSettings):
        for field, info in cls.model_fields.items():
            name = env_name(cls, field)
            default = "" if field == "database_url" else str(info.default)
            assert f"# {name}={default}" in text, name


def test_instance_n_shifts_its_ports_and_the_settings_stay_frozen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instance N of `make run CONSUMERS=3`: gRPC port +N, HTTP ports +10*N; 0 stays off."""
    monkeypatch.setenv("CONSUMER_INSTANCE", "2")
    monkeypatch.setenv("CONSUMER_PROFILING_PORT", "0")
    monkeypatch.setenv("PRODUCER_INSTANCE", "1")
    c, p = load(ConsumerSettings), load(ProducerSettings)
    assert (c.listen, c.metrics_port, c.profiling_port) == ("127.0.0.1:50053", 9122, 0)
    assert (p.metrics_port, p.profiling_port) == (9111, 6071)
    with pytest.raises(ValueError, match="frozen"):
        c.metrics_port = 1  # type: ignore[misc]
    monkeypatch.setenv("CONSUMER_INSTANCE", "x")
    with pytest.raises(SettingsError, match="CONSUMER_INSTANCE='x'"):
        load(ConsumerSettings)


def test_a_drain_longer_than_supervisor_waits_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STOPWAIT_ENV, "30")
    monkeypatch.setenv("CONSUMER_DRAIN_TIMEOUT", "60")
    with pytest.raises(SettingsError) as err:
        load(ConsumerSettings)
    assert str(err.value).startswith("invalid CONSUMER_DRAIN_TIMEOUT='60': accepted: at most 18 s")
    monkeypatch.setenv("CONSUMER_DRAIN_TIMEOUT", "18")
    assert load(ConsumerSettings).drain_timeout == 18
    monkeypatch.setenv("PRODUCER_DRAIN_TIMEOUT", "26")
    with pytest.raises(SettingsError, match="PRODUCER_DRAIN_TIMEOUT='26'"):
        load(ProducerSettings)
    monkeypatch.delenv(STOPWAIT_ENV)  # not under supervisor: up to the daemon's own limit
    assert load(ProducerSettings).drain_timeout == 26
