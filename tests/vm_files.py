"""The VM's provisioning files as both test tiers read them: where they are, and the
few pure parsers the checks share (tests/unit/test_vagrant.py reads the files only;
tests/system/test_vm_provisioning.py runs the tools)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

PROV = ROOT / "provisioning"
VM_DIR = PROV / "vm"
GRAFANA = PROV / "grafana"
SCRIPTS = [*sorted(PROV.glob("*.sh")), VM_DIR / "supervisorctl"]
SRC_IN_VM = "/opt/tasks/src"
# The ports the VM serves (guest side) and what listens there.
GUEST_PORTS = {"grafana": 3000, "prometheus": 9090, "grpc": 50051}


def assignment(path: Path, name: str) -> str:
    """The value of a `NAME=value` line of a script; of `NAME=${NAME:-default}`, the
    default (comments stripped)."""
    match = re.search(rf"^{name}=(.*?)\s*(?:#.*)?$", path.read_text(), re.M)
    assert match, f"{path.name}: no {name}=..."
    value = match.group(1).strip("\"'")
    default = re.fullmatch(rf"\$\{{{name}:-(.*)\}}", value)
    return default.group(1) if default else value


def yaml_values(text: str, key: str) -> list[str]:
    return [
        m.group(1).strip("\"'")
        for m in re.finditer(rf"^\s*(?:- )?{key}:\s*(\S.*?)\s*$", text, re.M)
    ]
