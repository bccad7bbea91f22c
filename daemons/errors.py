"""One exception hierarchy, mapped once to gRPC status codes (rpc interceptor) and to exit
codes (cli)."""

from __future__ import annotations


class DaemonError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class SettingsError(DaemonError):
    """A setting has a value that is not accepted; the message names it."""

    exit_code = 2


class DatabaseUnavailable(DaemonError):
    """The database could not be reached (in time)."""

    exit_code = 3


class InvalidTask(DaemonError):
    """A request carries a task or batch outside the protocol's bounds."""


class Draining(DaemonError):
    """The consumer is shutting down and takes no new work."""
