"""Helpers behind the Makefile's bundle targets (make run / stop / db_url).

python -m daemons.bundle write-conf     write .venv/etc/supervisord.conf
python -m daemons.bundle db-url         print the database URL the bundle uses
python -m daemons.bundle wait-flowing   wait until tasks reach `done`
python -m daemons.bundle prometheus     its URL, the rules it loaded, the alerts firing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from shutil import which
from typing import Any

from daemons import logs
from daemons.errors import DaemonError
from daemons.settings import CommonSettings, load, mask, secrets_in
from daemons.store import Store

ROOT = Path.cwd()
PROMETHEUS_URL = "http://127.0.0.1:9090"  # conf/prometheus.conf


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


def describe_prometheus(
    url: str, groups: list[dict[str, Any]], alerts: list[dict[str, Any]]
) -> str:
    """What `make prometheus` prints: the URL, the rule groups loaded (from
    /api/v1/rules), the rules that fail to evaluate, and the alerts (/api/v1/alerts)."""
    rules = [rule for group in groups for rule in group["rules"]]
    kinds = Counter(rule["type"] for rule in rules)
    files = sorted({Path(group["file"]).name for group in groups})
    lines = [
        url,
        f"rules: {len(groups)} groups from {', '.join(files) or 'no file'}: "
        f"{kinds['alerting']} alerting, {kinds['recording']} recording",
    ]
    failing = [rule["name"] for rule in rules if rule.get("health") == "err"]
    if failing:
        lines.append("rules failing to evaluate: " + ", ".join(failing))
    for state in ("firing", "pending"):
        named = sorted(_alert(a["labels"]) for a in alerts if a["state"] == state)
        lines.append(f"{state}: " + ("; ".join(named) or "none"))
    return "\n".join(lines)


def _alert(labels: dict[str, str]) -> str:
    """An alert as its name, then its job, instance and other labels' values."""
    first = ("alertname", "job", "instance")
    rest = sorted(k for k in labels if k not in (*first, "severity"))
    return " ".join(labels[k] for k in (*first, *rest) if k in labels)


def prometheus_status(url: str, timeout_s: float = 3.0) -> str:
    """describe_prometheus() of the server at `url`, or that it does not answer."""

    def get(path: str) -> Any:
        with urllib.request.urlopen(url + path, timeout=timeout_s) as resp:
            return json.loads(resp.read())["data"]

    try:
        return describe_prometheus(
            url, get("/api/v1/rules")["groups"], get("/api/v1/alerts")["alerts"]
        )
    except (OSError, ValueError, KeyError) as exc:
        return f"{url}\nnot answering ({exc}); make run starts it when prometheus is on PATH"


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
    prom = sub.add_parser("prometheus", help="the Prometheus of make run: rules and alerts")
    prom.add_argument("--url", default=PROMETHEUS_URL)
    args = parser.parse_args(argv)
    try:
        settings = load(CommonSettings)
        logs.redact(*secrets_in(settings.dsn()))
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
        elif args.cmd == "prometheus":
            print(prometheus_status(args.url))
        else:
            n = asyncio.run(_wait_flowing(settings.dsn(), args.tasks, args.timeout))
            print(f"tasks flowing: {n} reached done on {mask('URL', settings.dsn())}")
    except DaemonError as exc:
        print(f"bundle: {logs.scrub(str(exc))}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
