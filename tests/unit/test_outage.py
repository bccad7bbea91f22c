import logging

import pytest

from daemons.outage import Outage


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, object]]]:
    return [(r.getMessage(), dict(getattr(r, "fields", {}))) for r in caplog.records]


def test_an_episode_is_logged_once_at_each_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    edges: list[bool] = []
    outage = Outage("db_write", logging.getLogger("test.outage"), on_change=edges.append)
    outage.ok()  # nothing was failing: nothing to say
    for n in range(3):
        outage.failing(OSError(f"  connection refused {n}\n"))
    assert outage.active
    outage.ok()
    outage.ok()
    events = _events(caplog)
    assert [e for e, _ in events] == ["db_write_failing", "db_write_recovered"]
    assert events[0][1] == {"error": "connection refused 0"}
    after_s = events[1][1]["after_s"]
    assert isinstance(after_s, float) and after_s >= 0
    assert edges == [False, True] and not outage.active


def test_a_long_error_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    Outage("send", logging.getLogger("test.outage")).failing("x" * 5000)
    assert len(_events(caplog)[0][1]["error"]) == 300  # type: ignore[arg-type]


def test_an_episode_ends_only_once_failures_have_settled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    now = [0.0]
    edges: list[bool] = []
    outage = Outage("db_write", logging.getLogger("test.outage"), edges.append, 1.0, lambda: now[0])
    for t in (0.0, 0.5, 1.2):  # failures and successes interleaved: one episode
        now[0] = t
        outage.failing("disk full")
        now[0] = t + 0.1
        outage.ok()
    assert outage.active and edges == [False]
    now[0] = 2.3
    outage.ok()
    assert not outage.active and edges == [False, True]
    assert [r.getMessage() for r in caplog.records] == ["db_write_failing", "db_write_recovered"]
