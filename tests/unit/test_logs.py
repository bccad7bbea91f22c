import io
import json
import logging
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemons import logs


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_emit_rows_writes_what_one_record_per_line_would(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure("consumer", "INFO", fmt)
    log = logging.getLogger("daemons.consumer.tasks")
    names = ("id", "type", "value", "type_sum")
    rows = [(1, 3, 7, 7), (2, 3, 1, 8)]
    for row in rows:
        log.info("task_done", extra=logs.fields(**dict(zip(names, row, strict=True))))
    logs.emit_rows(log, "task_done", names, rows)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    if fmt == "json":
        docs = [json.loads(line) for line in lines]
        for doc in docs:
            doc.pop("ts")
        assert docs[:2] == docs[2:]
        assert docs[0]["event"] == "task_done" and docs[0]["type_sum"] == 7
    else:
        strip = [line.split(" ", 1)[1] for line in lines]  # drop the timestamp
        assert strip[:2] == strip[2:]
        assert strip[0] == "INFO consumer task_done id=1 type=3 value=7 type_sum=7"
    logging.getLogger().setLevel("WARNING")
    stream.seek(0)
    stream.truncate(0)
    logs.emit_rows(log, "task_done", names, rows)  # below the level: nothing
    assert stream.getvalue() == ""


def test_grpc_reply_to_an_ended_call_is_one_warning_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What grpc's server logs when a reply races the call's deadline (an ERROR and a
    traceback) becomes one WARNING line naming the method; its other errors stay ERRORs."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure("consumer", "INFO", "console")
    logs.configure("consumer", "INFO", "console")  # again: still one filter
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    assert sum(isinstance(f, logs.ReplyToEndedCall) for f in grpc_log.filters) == 1
    try:
        raise RuntimeError('Failed "execute_batch": (SendStatusFromServerOperation,)')
    except RuntimeError:
        grpc_log.exception(
            "ExecuteBatchError raised in core by servicer method [%s]",
            "/tasks.v1.Consumer/Submit",
        )
        grpc_log.exception("Unexpected [RuntimeError] raised by servicer method [/x/Y]")
    lines = [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines[0] == (
        "WARNING consumer rpc_reply_not_sent method=/tasks.v1.Consumer/Submit"
        " reason=call_ended_first"
    )
    assert lines[1].startswith("ERROR consumer Unexpected [RuntimeError]")
    assert "Traceback (most recent call last):" in stream.getvalue().split(lines[1])[1]


def test_id_ranges_are_short_runs() -> None:
    assert logs.id_ranges([5, 1, 2, 3, 9, 12, 13]) == "1-3,5,9,12-13"
    assert logs.id_ranges([]) == ""


@given(st.sets(st.integers(min_value=1, max_value=10_000)))
def test_id_ranges_round_trip(ids: set[int]) -> None:
    assert logs.parse_id_ranges(logs.id_ranges(ids)) == sorted(ids)
