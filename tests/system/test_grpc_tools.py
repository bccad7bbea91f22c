"""The consumer through the gRPC tools people already use: the real grpcurl binary
against a live consumer (reflection, calls, health, TLS), and every grpcurl command of the
README's section run as shown."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, need, sql, states
from tests.system.harness import Bundle, self_signed_cert, wait_until

SECTION = "## Talking to the consumer with grpcurl"
README_ADDRESS = "127.0.0.1:50051"
README_CERT = "cert.pem"
README_TOKEN = "docs-example-token-0123456789"  # the token the README's examples carry
SERVICES = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "tasks.v1.Consumer",
]
NO_REFLECTION = "server does not support the reflection API"


@pytest.fixture(scope="module")
def grpcurl() -> str:
    found = shutil.which("grpcurl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    need(found is not None, "grpcurl (the dev extras install it on x86-64 Linux)")
    return str(found)


@dataclass
class Grpcurl:
    binary: str
    address: str

    def run(
        self, *args: str, data: str | None = None, flags: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """`grpcurl -plaintext [flags] [-d data] ADDRESS args...`, run from the repository
        root (where `-import-path proto` points)."""
        argv = [self.binary, "-plaintext", *flags, *(["-d", data] if data is not None else [])]
        return run([*argv, self.address, *args])


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.fixture
def client(grpcurl: str, bundle: Bundle) -> Grpcurl:
    return Grpcurl(grpcurl, f"127.0.0.1:{bundle.grpc_port}")


def count(db_url: str) -> int:
    return int(sql(db_url, "SELECT count(*) FROM tasks")[0][0])  # type: ignore[call-overload]


def test_list_describe_submit_and_a_bad_batch_writes_nothing(
    bundle: Bundle, client: Grpcurl
) -> None:
    bundle.consumer()
    listed = client.run("list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == SERVICES
    described = client.run("describe", "tasks.v1.Consumer")
    assert described.returncode == 0, described.stderr
    assert "rpc Submit (" in described.stdout and "rpc SubmitBatch (" in described.stdout

    submitted = client.run("tasks.v1.Consumer/Submit", data='{"task": {"type": 3, "value": 42}}')
    assert submitted.returncode == 0, submitted.stderr
    task_id = int(re.findall(r'"id": "(\d+)"', submitted.stdout)[0])
    assert '"status": "TASK_STATUS_ACCEPTED"' in submitted.stdout
    row = sql(bundle.db_url, "SELECT type, value, state::text FROM tasks WHERE id = %s", (task_id,))
    assert row and row[0][:2] == (3, 42) and row[0][2] in ("processing", "done"), row

    before = count(bundle.db_url)
    refused = client.run(
        "tasks.v1.Consumer/SubmitBatch",
        data='{"tasks": [{"type": 1, "value": 5}, {"type": 10, "value": 7}]}',
    )
    assert refused.returncode != 0
    assert "Code: InvalidArgument" in refused.stderr and "type 10" in refused.stderr
    assert count(bundle.db_url) == before  # not even the valid first task

    batch = client.run(
        "tasks.v1.Consumer/SubmitBatch",
        data='{"tasks": [{"type": 1, "value": 5}, {"type": 2, "value": 7}]}',
    )
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.count("TASK_STATUS_ACCEPTED") == 2
    wait_until(lambda: states(bundle.db_url)["done"] == before + 2, 10, "all three done")


def test_health_is_not_serving_from_the_start_of_a_drain(
    bundle: Bundle, client: Grpcurl, tmp_path: Path
) -> None:
    # 99 ms of work times 100: the task stays in flight ~10 s, so the drain lasts that long.
    consumer = bundle.consumer(CONSUMER_WORK_SCALE="100", CONSUMER_DRAIN_TIMEOUT="30")
    checked = client.run("grpc.health.v1.Health/Check")
    assert checked.returncode == 0 and '"status": "SERVING"' in checked.stdout, checked
    of_service = client.run("grpc.health.v1.Health/Check", data='{"service": "tasks.v1.Consumer"}')
    assert '"status": "SERVING"' in of_service.stdout, of_service
    batch = client.run(
        "tasks.v1.Consumer/SubmitBatch", data='{"tasks": [{"type": 1, "value": 99}]}'
    )
    assert batch.returncode == 0, batch.stderr
    # A Watch stream opened before the signal hears of it; a new call after it finds the port
    # closed (RPCs stop right after health flips), as a polling probe would.
    watched = tmp_path / "watch.out"
    with open(watched, "w") as out:
        watch = subprocess.Popen(
            [client.binary, "-plaintext", client.address, "grpc.health.v1.Health/Watch"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: '"SERVING"' in watched.read_text(), 10, "Watch says SERVING")
        consumer.terminate()
        consumer.wait_event("consumer_draining", 10)
        wait_until(lambda: '"NOT_SERVING"' in watched.read_text(), 5, "Watch says NOT_SERVING")
        assert states(bundle.db_url)["processing"] == 1  # still draining
        late = client.run("grpc.health.v1.Health/Check")
        assert late.returncode != 0 and "connection refused" in late.stderr, late
    finally:
        watch.kill()
        watch.wait(10)
    assert consumer.wait(30) == 0
    assert states(bundle.db_url) == {"received": 0, "processing": 0, "done": 1}


def test_reflection_off_list_fails_and_the_proto_still_works(
    bundle: Bundle, client: Grpcurl
) -> None:
    bundle.consumer(CONSUMER_REFLECTION="false")
    listed = client.run("list")
    assert listed.returncode != 0 and NO_REFLECTION in listed.stderr, listed
    assert listed.stderr.strip() in " ".join(readme_section().split())
    with_proto = client.run(
        "tasks.v1.Consumer/Submit",
        data='{"task": {"type": 1, "value": 1}}',
        flags=("-import-path", "proto", "-proto", "tasks/v1/tasks.proto"),
    )
    assert with_proto.returncode == 0 and "TASK_STATUS_ACCEPTED" in with_proto.stdout, with_proto
    checked = client.run("grpc.health.v1.Health/Check")  # grpcurl has no health .proto here
    assert checked.returncode != 0 and NO_REFLECTION in checked.stderr


@dataclass
class Example:
    argv: list[str]
    shown: str  # the output the README shows

    @property
    def kind(self) -> str:
        """Which consumer the example is written for."""
        if "-H" in self.argv:
            return "token"
        return "tls" if "-cacert" in self.argv else "proto" if "-proto" in self.argv else "plain"


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(SECTION + "\n", 1)[1].split("\n## ", 1)[0]


def readme_examples() -> list[Example]:
    """Every `$ grpcurl ...` line of the section's code blocks, with the lines after it."""
    examples = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", readme_section(), flags=re.M | re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, shown = chunk.partition("\n")
            examples.append(Example(shlex.split(command), shown.strip()))
    return examples


def as_ids(text: str) -> str:
    """Ids depend on the database: compare them as ids (int64 is a string in JSON)."""
    return re.sub(r'"\d+"', '"<id>"', text.strip())


def test_readme_grpcurl_examples_run_as_shown(bundle: Bundle, grpcurl: str, tmp_path: Path) -> None:
    examples = readme_examples()
    words = {w for e in examples for w in e.argv}
    wanted = {"list", "describe", "tasks.v1.Consumer/Submit", "tasks.v1.Consumer/SubmitBatch"}
    assert wanted | {"grpc.health.v1.Health/Check", "-cacert", "-H"} <= words, words
    cert, key = self_signed_cert(tmp_path)
    env = {
        "plain": {},
        "tls": {"CONSUMER_TLS_CERT": str(cert), "CONSUMER_TLS_KEY": str(key)},
        "proto": {"CONSUMER_REFLECTION": "false"},
        "token": {"CONSUMER_AUTH_TOKENS": f"docs:{README_TOKEN}"},
    }
    address = f"127.0.0.1:{bundle.grpc_port}"
    consumer, kind = None, None
    for example in examples:
        assert example.argv[0] == "grpcurl" and README_ADDRESS in example.argv, example
        if example.kind != kind:
            if consumer is not None:
                consumer.terminate()
                assert consumer.wait(20) == 0
            consumer, kind = bundle.consumer(**env[example.kind]), example.kind
        swap = {"grpcurl": grpcurl, README_ADDRESS: address, README_CERT: str(cert)}
        argv = [swap.get(word, word) for word in example.argv]
        out = run(argv)
        print(f"$ {shlex.join(argv)}\n{out.stdout}{out.stderr}")  # the transcript, with -s
        failed = example.shown.startswith(("ERROR:", "Failed", "Error invoking"))
        assert (out.returncode != 0) == failed, (example, out)
        assert as_ids(out.stdout + out.stderr) == as_ids(example.shown), example.argv
