import filecmp
from pathlib import Path

import pytest

from daemons import schema_dir
from daemons.errors import InvalidTask
from daemons.outbox import batch_size, random_tasks
from daemons.protogen import ROOT, generate
from daemons.rpc.tasks.v1 import tasks_pb2
from daemons.rpc_server import validate_batch
from daemons.store import queries

NEEDED = {
    "insert_batch",
    "mark_processing",
    "mark_done",
    "release_processing",
    "existing_ids",
    "count_unfinished",
    "count_by_state",
    "done_totals_by_type",
    "reclaim_expired",
    "claim_stale_received",
}


def test_every_named_query_is_loaded_and_names_its_columns() -> None:
    qs = queries()
    assert NEEDED <= set(qs)
    for name, text in qs.items():
        assert text and "--" not in text, name
        assert "SELECT *" not in text.upper().replace("SELECT * FROM UNNEST", ""), name
    # Transitions are conditional on the expected state.
    assert "state = 'received'" in qs["mark_processing"]
    assert "state = 'processing'" in qs["mark_done"]
    assert "SKIP LOCKED" in qs["reclaim_expired"] and "SKIP LOCKED" in qs["claim_stale_received"]


def test_migrations_have_rollbacks() -> None:
    mig = schema_dir() / "migrations"
    ups = sorted(p for p in mig.glob("*.sql") if not p.name.endswith(".rollback.sql"))
    assert [p.name[:4] for p in ups] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    for up in ups:
        assert up.with_name(up.stem + ".rollback.sql").exists()
    # One chain, the migrations that come and go while the daemons run (0003, 0005) last,
    # so `migrator down` never takes a column the daemons' queries need (0004's).
    depends = {
        up.stem[:4]: up.read_text().splitlines()[0].removeprefix("-- depends: ")[:4]
        for up in ups[1:]
    }
    assert depends == {
        "0002": "0001",
        "0004": "0002",
        "0006": "0004",
        "0003": "0006",
        "0005": "0003",
    }


@pytest.mark.parametrize(
    ("credit", "room", "cap", "remaining", "want"),
    [
        (5.7, 100, 1000, None, 5),
        (5000, 100, 1000, None, 100),
        (5000, 9999, 1000, None, 1000),
        (50, 100, 1000, 3, 3),
        (0.9, 10, 10, None, 0),
        (10, -5, 10, None, 0),
    ],
)
def test_batch_size(credit: float, room: int, cap: int, remaining: int | None, want: int) -> None:
    assert batch_size(credit, room, cap, remaining) == want


def test_random_tasks_in_range() -> None:
    types, values = random_tasks(5000)
    assert set(types) == set(range(10))
    assert min(values) == 0 and max(values) == 99 and len(values) == 5000


def _tasks(*specs: tuple[int, int, int]) -> list[tasks_pb2.Task]:
    return [tasks_pb2.Task(id=i, type=t, value=v) for i, t, v in specs]


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ([(1, 10, 5)], "type 10"),
        ([(1, 3, 100)], "value 100"),
        ([(1, 3, -1)], "value -1"),
        ([(1, -1, 3)], "type -1"),
        ([(-4, 1, 3)], "negative"),
        ([(5, 1, 3), (5, 2, 2)], "twice"),
        ([], "empty"),
    ],
)
def test_validation_refuses_bad_batches(specs: list[tuple[int, int, int]], match: str) -> None:
    with pytest.raises(InvalidTask, match=match):
        validate_batch(_tasks(*specs), 100)


def test_validation_caps_batch_size_and_accepts_good() -> None:
    with pytest.raises(InvalidTask, match="exceeds"):
        validate_batch(_tasks(*[(i + 1, 1, 1) for i in range(11)]), 10)
    ok = validate_batch(_tasks((0, 0, 0), (0, 9, 99), (7, 5, 50)), 10)
    assert [(t.id, t.type, t.value) for t in ok] == [(0, 0, 0), (0, 9, 99), (7, 5, 50)]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = tmp_path / "daemons" / "rpc" / "tasks" / "v1"
    committed = ROOT / "daemons" / "rpc" / "tasks" / "v1"
    names = ["tasks_pb2.py", "tasks_pb2.pyi", "tasks_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale stubs {mismatch + errors}: run `make proto_gen`"


def test_every_connection_gets_tcp_timeouts_and_the_session_timeouts() -> None:
    from psycopg.conninfo import conninfo_to_dict

    from daemons.store import TCP_PARAMS, session_conninfo

    url = "postgresql://u@h1:5432,h2:5433/tasks?target_session_attrs=read-write"
    got = conninfo_to_dict(session_conninfo(url, 10.0, 2.5))
    assert got["host"] == "h1,h2" and got["port"] == "5432,5433"
    assert got["target_session_attrs"] == "read-write"
    assert {k: got[k] for k in TCP_PARAMS} == TCP_PARAMS
    assert got["options"] == (
        "-c statement_timeout=10000 -c lock_timeout=2500"
        " -c idle_in_transaction_session_timeout=15000 -c plan_cache_mode=force_custom_plan"
    )
    # What the URL says itself is kept: its own TCP settings, and its options after ours.
    own = "postgresql://u@h/tasks?keepalives_idle=60&options=-c%20lock_timeout%3D9s"
    got = conninfo_to_dict(session_conninfo(own, 10.0, 2.0))
    assert got["keepalives_idle"] == "60"
    assert got["options"].endswith(" -c lock_timeout=9s")
