"""Helpers behind the Makefile's bundle targets (make run / stop / db_url).

python -m daemons.bundle write-conf     write .venv/etc/supervisord.conf
python -m daemons.bundle db-url         print the database URL the bundle uses
python -m daemons.bundle wait-flowing   wait until tasks reach `done`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from shutil import which

from daemons import logs
from daemons.errors import DaemonError
from daemons.settings import _Common, load, mask
from daemons.store import Store

ROOT = Path.cwd()


class BundleSettings(_Common):
    pass


def supervisor_conf(root: Path, local_db: bool, prometheus: bool, scaled: bool = False) -> str:
    files = [str(root / "conf" / "supervisord.conf")]
    if scaled:
        files.append(str(root / "conf" / "scale.conf"))
    if local_db:
        files.append(str(root / "conf" / "localdb.conf"))
    if prometheus:
        files.append(str(root / "conf" / "prometheus.conf"))
    return (
        "; Written by `make run` (python -m daemons.bundle write-conf); edit conf/ instead.\n"
        "; supervisorctl finds this file on its own when run from the venv.\n"
        "[include]\nfiles = " + " ".join(files) + "\n\n"
        # supervisorctl reads only this file (it does not follow [include]).
        f"[supervisorctl]\nserverurl = unix://{root / 'var' / 'run' / 'supervisor.sock'}\n"
    )


def consumer_target(consumers: int, base_port: int = 50051) -> str:
    """The producer's target for N local consumers (instance N listens on base+N)."""
    if consumers <= 1:
        return f"127.0.0.1:{base_port}"
    return "ipv4:" + ",".join(f"127.0.0.1:{base_port + n}" for n in range(consumers))


def write_scrape_targets(directory: Path, consumers: int, producers: int) -> None:
    """File-based service discovery for conf/prometheus.yml: the instances beyond the
    first, which the static targets already cover."""
    directory.mkdir(parents=True, exist_ok=True)
    for job, count, base in (("consumer", consumers, 9102), ("producer", producers, 9101)):
        targets = [f"127.0.0.1:{base + 10 * n}" for n in range(1, count)]
        doc = [{"targets": targets, "labels": {}}] if targets else []
        (directory / f"extra-{job}s.json").write_text(json.dumps(doc) + "\n")


async def _wait_flowing(dsn: str, want: int, timeout_s: float) -> int:
    store = Store(dsn, pool_size=1, name="bundle")
    await store.open(timeout_s)
    try:
        deadline = time.monotonic() + timeout_s
        start = (await store.count_by_state())["done"]
        while time.monotonic() < deadline:
            done = (await store.count_by_state())["done"]
            if done - start >= want:
                return done - start
            await asyncio.sleep(0.5)
        raise DaemonError(f"fewer than {want} tasks reached done within {timeout_s:.0f}s")
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemons.bundle")
    sub = parser.add_subparsers(dest="cmd", required=True)
    write = sub.add_parser("write-conf")
    write.add_argument("--consumers", type=int, default=1)
    write.add_argument("--producers", type=int, default=1)
    targets = sub.add_parser("consumer-target", help="gRPC target naming N local consumers")
    targets.add_argument("consumers", type=int)
    sub.add_parser("db-url")
    wait = sub.add_parser("wait-flowing")
    wait.add_argument("--tasks", type=int, default=10)
    wait.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    try:
        settings = load(BundleSettings)
        logs.configure("bundle", "WARNING", "console")
        if args.cmd == "write-conf":
            etc = Path(sys.prefix) / "etc"
            etc.mkdir(exist_ok=True)
            conf = etc / "supervisord.conf"
            conf.write_text(
                supervisor_conf(
                    ROOT,
                    settings.database_url is None,
                    bool(which("prometheus")),
                    scaled=args.consumers > 1 or args.producers > 1,
                )
            )
            write_scrape_targets(ROOT / "var" / "prometheus", args.consumers, args.producers)
            print(conf)
        elif args.cmd == "consumer-target":
            print(consumer_target(args.consumers))
        elif args.cmd == "db-url":
            print(settings.dsn())
        else:
            n = asyncio.run(_wait_flowing(settings.dsn(), args.tasks, args.timeout))
            print(f"tasks flowing: {n} reached done on {mask('URL', settings.dsn())}")
    except DaemonError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
