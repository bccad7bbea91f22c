"""Regenerate the gRPC stubs (`make proto_gen`); the stale-stub test uses `generate()`.

Stubs are written under daemons/rpc with `-I daemons/rpc=proto`, so their imports are
`daemons.rpc.tasks.v1...` with no post-processing."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["proto/tasks/v1/tasks.proto"]


def generate(out_dir: Path, root: Path = ROOT) -> None:
    from grpc_tools import protoc

    for proto in PROTOS:
        args = [
            "protoc",
            f"-Idaemons/rpc={root / 'proto'}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(root / proto).replace(str(root / "proto"), "daemons/rpc", 1),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {proto}")


if __name__ == "__main__":
    generate(ROOT)
    print("stubs written under daemons/rpc", file=sys.stderr)
    sys.exit(0)
