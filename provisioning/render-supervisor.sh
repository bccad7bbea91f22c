#!/usr/bin/env bash
# Renders the VM's supervisord configuration from the repository's, the way `make run`
# does, so that the VM and a developer's machine run the same program definitions:
#
#   ROOT/conf/          a copy of the repository's conf/ (so `%(here)s/..` is ROOT and
#                       logs and sockets land in ROOT/var/)
#   OUT                 [include]s ROOT/conf/supervisord.conf: daemons.bundle's
#                       supervisor_conf(), the very function behind `make run`, without
#                       the local database and Prometheus (the VM runs Debian's)
#
# Usage: render-supervisor.sh PYTHON SRC ROOT OUT
#   PYTHON  a Python that imports `daemons` (the VM's venv; the tests' own)
# Prints one line per file it changed; nothing when all was already up to date.
# tests/system/test_vm_provisioning.py runs it for real and compares the result with conf/.
set -euo pipefail

[[ $# == 4 ]] || { echo "usage: $0 PYTHON SRC ROOT OUT" >&2; exit 2; }
python=$1 src=$2 root=$3 out=$4

if ! diff -r -q "$src/conf" "$root/conf" >/dev/null 2>&1; then
  mkdir -p "$root"
  rm -rf "$root/conf.new"
  cp -R "$src/conf" "$root/conf.new"
  rm -rf "$root/conf"
  mv "$root/conf.new" "$root/conf"
  echo "updated $root/conf/"
fi

mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
"$python" - "$root" >"$tmp" <<'PY'
import sys
from pathlib import Path

from daemons.bundle import supervisor_conf

print("; Rendered by provisioning/render-supervisor.sh; edit the repository's conf/ instead.")
# No local database (Debian's PostgreSQL) and no Prometheus program (Debian's
# prometheus.service, which port forwarding can reach: see 40-prometheus.sh).
sys.stdout.write(supervisor_conf(Path(sys.argv[1]), local_db=False, prometheus=False))
PY
if ! cmp -s "$tmp" "$out"; then
  chmod 0644 "$tmp"
  mv "$tmp" "$out"
  echo "updated $out"
fi
