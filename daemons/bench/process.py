"""A daemon as a child process, for the tests, the chaos suite and the bench: started with
its log in a file, waited for (a log event, or a probe when its logs are above INFO),
read back event by event, and stopped with signals. One class, so that the three cannot
drift apart.

    consumer = Daemon.start("consumer", env, workdir)
    consumer.wait_event("consumer_started")
    ...
    assert consumer.stop() == 0        # SIGTERM, a bounded wait, then SIGKILL
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from signal import SIGKILL, SIGTERM
from typing import Any

BIN = Path(sys.executable).parent
STOP_TIMEOUT_S = 30.0


class HarnessError(AssertionError):
    """A process or a wait that did not turn out as expected. An AssertionError, so that
    pytest reports it as a failed expectation; the bench reports it and exits 1."""


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1) -> Any:
    """Poll `pred` until it returns something truthy; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every_s)
    raise HarnessError(f"timed out after {timeout_s}s waiting for: {what} (last: {last!r})")


def stop(
    popen: subprocess.Popen[Any] | None,
    sig: int = SIGTERM,
    timeout_s: float = STOP_TIMEOUT_S,
) -> int:
    """Signal (unless it has exited), wait up to `timeout_s`, then SIGKILL: the exit code."""
    if popen is None:
        return 0
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(sig)
        try:
            popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)
    return int(popen.returncode)


def parse_events(log: str, event: str) -> list[dict[str, str]]:
    """Fields of every console log line (`date time level event k=v ...`) naming `event`."""
    out = []
    for line in log.splitlines():
        parts = line.split(" ", 4)
        if len(parts) >= 4 and parts[3] == event:
            out.append(dict(re.findall(r"(\w+)=(\S+)", parts[4] if len(parts) > 4 else "")))
    return out


class Daemon:
    """One process with its log file (stdout and stderr) in its working directory."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        *,
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.env = env
        self.log_path = cwd / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:  # the child holds its own descriptor
            self.popen = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,  # no .env of the checkout leaks in
                stdout=log,
                stderr=subprocess.STDOUT,
                # The bench: Ctrl-C reaches the bench only, which stops daemons in order.
                start_new_session=new_session,
            )

    @classmethod
    def start(cls, name: str, env: dict[str, str], cwd: Path, **kw: Any) -> Daemon:
        """One of the console scripts of this environment (consumer, producer, ...)."""
        return cls(name, [str(BIN / name)], env, cwd, **kw)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise HarnessError(
                f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}"
            )

    def events(self, event: str) -> list[dict[str, str]]:
        return parse_events(self.log(), event)

    def wait_event(
        self,
        event: str,
        timeout_s: float = 30.0,
        probe: Callable[[], bool] | None = None,
    ) -> dict[str, str]:
        """The fields of the last `event` line, once there is one; or {} once `probe` says
        so (a daemon whose logs are above INFO never writes its start-up line). Fails if
        the process exits first."""

        def seen() -> dict[str, str] | bool:
            found = self.events(event)
            if found:
                return found[-1]
            return not self.alive() or (probe is not None and probe())

        result = wait_until(seen, timeout_s, f"{self.name} logs {event}", every_s=0.05)
        if result is True:
            self.check()  # exited: fails with the exit code and the log
            return {}
        return result  # type: ignore[no-any-return]

    def signal(self, sig: int = SIGTERM) -> None:
        self.popen.send_signal(sig)

    def terminate(self) -> None:
        self.signal(SIGTERM)

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        return self.popen.wait(timeout_s)

    def stop(self, sig: int = SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        return stop(self.popen, sig, timeout_s)

    def kill(self) -> None:
        stop(self.popen, SIGKILL, 10)
