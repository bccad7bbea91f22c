"""Request validation of the consumer (daemons.rpc_server): what an untrusted client may
send as a task's creation_time, and requests that carry no task at all."""

from __future__ import annotations

import math
import time

import pytest

from daemons.errors import InvalidTask
from daemons.rpc.tasks.v1 import tasks_pb2
from daemons.rpc_server import (
    MAX_CLOCK_SKEW_S,
    MAX_TASK_AGE_S,
    ConsumerServicer,
    to_new_task,
    validate_batch,
)

NOW = 1_700_000_000.0
OLDEST, NEWEST = NOW - MAX_TASK_AGE_S, NOW + MAX_CLOCK_SKEW_S


def _task(id_: int, creation_time: float) -> tasks_pb2.Task:
    return tasks_pb2.Task(id=id_, type=3, value=4, creation_time=creation_time)


@pytest.mark.parametrize(
    "stamp", [math.inf, -math.inf, math.nan, -1.0, 1.0, 1e12, OLDEST - 0.5, NEWEST + 0.5]
)
def test_a_new_task_stamped_outside_the_accepted_window_is_refused(stamp: float) -> None:
    with pytest.raises(InvalidTask) as err:
        to_new_task(_task(0, stamp), now=NOW)
    message = str(err.value)
    assert message.startswith(f"creation_time {stamp!r} out of range: 0 (unset)"), message
    assert f"[{OLDEST:.3f}, {NEWEST:.3f}]" in message
    assert f"now - {MAX_TASK_AGE_S:.0f} s .. now + {MAX_CLOCK_SKEW_S:.0f} s" in message


@pytest.mark.parametrize("stamp", [0.0, NOW, OLDEST, NEWEST])
def test_a_new_task_stamped_unset_or_within_the_window_is_taken_as_sent(stamp: float) -> None:
    assert to_new_task(_task(0, stamp), now=NOW).creation_time == stamp


@pytest.mark.parametrize("stamp", [math.inf, -math.inf, math.nan, -1.0])
def test_a_known_task_needs_a_finite_stamp(stamp: float) -> None:
    with pytest.raises(InvalidTask, match=r"creation_time .* finite unix time >= 0"):
        to_new_task(_task(7, stamp), now=NOW)


@pytest.mark.parametrize("stamp", [0.0, 1.0, OLDEST - 86400.0, NOW, 1e12])
def test_a_known_task_may_be_any_age(stamp: float) -> None:
    """The consumer times it from the row's own creation_time, not from this one."""
    assert to_new_task(_task(7, stamp), now=NOW).creation_time == stamp


def test_a_batch_names_the_task_with_the_bad_stamp() -> None:
    batch = [_task(0, NOW), _task(0, math.inf)]
    with pytest.raises(InvalidTask, match=r"^tasks\[1\]: creation_time inf out of range"):
        validate_batch(batch, 10, now=NOW)


def test_the_window_follows_the_clock() -> None:
    """Without `now`, the window is around time.time(): a stamp of now passes."""
    assert validate_batch([_task(0, time.time())], 10)[0].type == 3
    with pytest.raises(InvalidTask):
        validate_batch([_task(0, time.time() - MAX_TASK_AGE_S - 60)], 10)


class Refusing:
    """An engine that must not be reached."""

    async def admit(self, tasks: object) -> object:
        raise AssertionError(f"admitted {tasks!r}")


async def test_submit_without_a_task_is_refused_before_the_engine() -> None:
    servicer = ConsumerServicer(Refusing(), max_batch=10)  # type: ignore[arg-type]
    with pytest.raises(InvalidTask, match="request has no task"):
        await servicer.Submit(tasks_pb2.SubmitRequest(), None)  # type: ignore[arg-type]


async def test_submit_batch_without_tasks_is_refused_before_the_engine() -> None:
    servicer = ConsumerServicer(Refusing(), max_batch=10)  # type: ignore[arg-type]
    with pytest.raises(InvalidTask, match="empty batch"):
        await servicer.SubmitBatch(tasks_pb2.SubmitBatchRequest(), None)  # type: ignore[arg-type]


def test_an_idempotency_key_is_for_new_tasks_and_bounded() -> None:
    key = "k" * 128
    task = to_new_task(tasks_pb2.Task(id=0, type=1, value=1, idempotency_key=key), now=NOW)
    assert task.key == key
    with pytest.raises(InvalidTask, match="new tasks"):
        to_new_task(tasks_pb2.Task(id=5, type=1, value=1, idempotency_key="k"), now=NOW)
    with pytest.raises(InvalidTask, match="longer than 128"):
        to_new_task(tasks_pb2.Task(id=0, type=1, value=1, idempotency_key=key + "k"), now=NOW)
