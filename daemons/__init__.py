"""Producer/consumer task daemons on gRPC and PostgreSQL."""

from __future__ import annotations

import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def schema_dir() -> Path:
    """Migrations and queries: inside the package when installed from a wheel, else the
    repository's `schema/` (editable install)."""
    inside = PACKAGE_DIR / "schema"
    return inside if inside.is_dir() else PACKAGE_DIR.parent / "schema"


@cache
def version() -> str:
    try:
        return metadata.version("tasks-daemons")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@cache
def commit() -> str:
    """The git commit the code runs from: live from git when it is a checkout, else the
    one recorded at build time, else "unknown"."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        sha = out.stdout.strip()
        if sha:
            dirty = subprocess.run(
                ["git", "-C", str(PACKAGE_DIR), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    # Built from git: the version's local part is "g<commit>" (hatch-vcs node-and-date).
    local = version().partition("+")[2]
    for part in local.split("."):
        if part.startswith("g") and len(part) > 7:
            return part[1:]
    return "unknown"
