"""Passwords never printed (issue 16): every form libpq accepts a password in is masked
for display, and every line the logging prints has the password itself redacted."""

from __future__ import annotations

import logging

import pytest

from daemons import logs
from daemons.settings import mask, secrets_in

PW = "S3cr3t-pw_4711"
FORMS = {
    "user info": f"postgresql://tasks:{PW}@127.0.0.1:5432/tasks",
    "user info, multi-host": f"postgresql://tasks:{PW}@h1:5432,h2:5433/tasks?target_session_attrs=read-write",
    "user info, IPv6": f"postgres://tasks:{PW}@[::1]:5432/tasks",
    "user info with @": f"postgresql://tasks:{PW}@x@127.0.0.1/tasks",
    "query": f"postgresql://tasks@127.0.0.1/tasks?sslmode=disable&password={PW}",
    "query, encoded key": f"postgresql://tasks@127.0.0.1/tasks?pass%77ord={PW}",
    "query, upper case": f"postgresql://tasks@127.0.0.1/tasks?PASSWORD={PW}&x=1",
    "keyword": f"host=127.0.0.1 user=tasks password={PW} dbname=tasks",
    "keyword, spaced and quoted": f"host=127.0.0.1 password = '{PW} \\' x' dbname=tasks",
}


@pytest.mark.parametrize("form", FORMS)
def test_mask_hides_the_password_in_every_form(form: str) -> None:
    shown = mask("DATABASE_URL", FORMS[form])
    assert PW not in shown and "***" in shown
    assert "127.0.0.1" in shown or "h1:5432,h2:5433" in shown or "[::1]" in shown


@pytest.mark.parametrize("form", FORMS)
def test_secrets_in_finds_the_password_in_every_form(form: str) -> None:
    assert any(PW in s for s in secrets_in(FORMS[form]))


def test_urls_without_a_password_are_shown_as_they_are() -> None:
    for url in ("postgresql://tasks@127.0.0.1:54329/tasks?passfile=/x/pgpass", "postgresql://h/db"):
        assert mask("DATABASE_URL", url) == url
        assert secrets_in(url) == set()


def test_percent_encoded_passwords_are_redacted_decoded_too() -> None:
    assert secrets_in("postgresql://u:p%40ss@h/db") == {"p%40ss", "p@ss"}


def test_secret_names_are_masked_whole() -> None:
    assert mask("CONSUMER_AUTH_TOKENS", "abc,def") == "***"


def test_every_formatted_log_line_is_redacted() -> None:
    logs.redact(*secrets_in(FORMS["user info"]))
    record = logging.makeLogRecord(
        {"msg": "fatal", "fields": {"error": f'invalid percent-encoded token: "{PW}"'}}
    )
    try:
        raise RuntimeError(f"driver said {PW}")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    for formatter in (logs.ConsoleFormatter("t"), logs.JsonFormatter("t")):
        line = formatter.format(record)
        assert PW not in line and "***" in line
