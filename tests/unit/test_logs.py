import io
import json
import logging
import sys

import pytest

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
