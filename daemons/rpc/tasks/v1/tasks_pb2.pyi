from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_ACCEPTED: _ClassVar[TaskStatus]
    TASK_STATUS_RATE_LIMITED: _ClassVar[TaskStatus]
    TASK_STATUS_DUPLICATE: _ClassVar[TaskStatus]
    TASK_STATUS_INVALID: _ClassVar[TaskStatus]
    TASK_STATUS_BUSY: _ClassVar[TaskStatus]
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_ACCEPTED: TaskStatus
TASK_STATUS_RATE_LIMITED: TaskStatus
TASK_STATUS_DUPLICATE: TaskStatus
TASK_STATUS_INVALID: TaskStatus
TASK_STATUS_BUSY: TaskStatus

class Task(_message.Message):
    __slots__ = ("id", "type", "value", "creation_time", "idempotency_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    id: int
    type: int
    value: int
    creation_time: float
    idempotency_key: str
    def __init__(self, id: _Optional[int] = ..., type: _Optional[int] = ..., value: _Optional[int] = ..., creation_time: _Optional[float] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("id", "status")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    id: int
    status: TaskStatus
    def __init__(self, id: _Optional[int] = ..., status: _Optional[_Union[TaskStatus, str]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class SubmitBatchReply(_message.Message):
    __slots__ = ("ids", "statuses")
    IDS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    statuses: _containers.RepeatedScalarFieldContainer[TaskStatus]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., statuses: _Optional[_Iterable[_Union[TaskStatus, str]]] = ...) -> None: ...
