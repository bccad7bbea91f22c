"""The engine's statuses are tasks.v1.TaskStatus under other names: same numbers, so the
transport passes them through without converting each one."""

from daemons.engine import TaskStatus
from daemons.rpc.tasks.v1 import tasks_pb2

PREFIX = "TASK_STATUS_"


def test_every_status_is_the_generated_one() -> None:
    wire = dict(tasks_pb2.TaskStatus.items())
    assert wire.pop(PREFIX + "UNSPECIFIED") == 0  # proto3's default, never sent by us
    assert {PREFIX + s.name: s.value for s in TaskStatus} == wire
    for s in TaskStatus:
        assert tasks_pb2.TaskStatus.Name(s) == PREFIX + s.name


def test_statuses_survive_a_round_trip_through_a_reply() -> None:
    sent = list(TaskStatus)
    reply = tasks_pb2.SubmitBatchReply(ids=range(len(sent)), statuses=sent)
    got = tasks_pb2.SubmitBatchReply.FromString(reply.SerializeToString()).statuses
    assert [TaskStatus(s) for s in got] == sent
