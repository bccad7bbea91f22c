#!/usr/bin/env bash
# Live profiles of a running daemon, written into a directory with a timestamped name
# and a stable "latest" copy. Behind `make consumer_cpu`, `make producer_heap`, ...
#
#   loadtest/profile.sh [-p PID] [-o DIR] [-s SECONDS] [-P PROFILING_PORT] KIND DAEMON
#
#   KIND    cpu     py-spy record: SVG flame graph + speedscope JSON (speedscope.app)
#           heap    memray attach: capture (.bin) + flame graph (.html) + stats (.txt)
#           stacks  py-spy dump of every thread + the daemon's /debug/tasks asyncio dump
#           all     stacks, cpu, heap, one after the other
#   DAEMON  consumer or producer (names the files; picks the default profiling port)
#   -p      pid to attach to (default: `supervisorctl pid DAEMON`)
#   -o      output directory (default: profiles/ in the repository)
#   -s      seconds to record cpu and heap (default: 10)
#   -P      the daemon's profiling port (default: its settings, from the environment
#           and .env as the daemon reads them)
#
# Exit status: 0 done; 1 a profile failed; 2 usage; 3 could not attach (permissions or
# debugger): the message says what to do instead.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -d "$ROOT/.venv/bin" ] && PATH="$ROOT/.venv/bin:$PATH"
PY=$(command -v python || command -v python3)

usage() { sed -n '5,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }
die() { echo "profile: $*" >&2; exit "${2:-1}"; }

pid="" out="$ROOT/profiles" seconds=10 port=""
while getopts "p:o:s:P:h" opt; do
  case $opt in
    p) pid=$OPTARG ;;
    o) out=$OPTARG ;;
    s) seconds=$OPTARG ;;
    P) port=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || usage
kind=$1 daemon=$2
case $kind in cpu | heap | stacks | all) ;; *) usage ;; esac
case $daemon in consumer | producer) ;; *) usage ;; esac
[[ $seconds =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || die "-s wants whole seconds > 0, not '$seconds'" 2

if [ -z "$pid" ]; then
  # The Makefile passes its own SUPERVISORCTL command line.
  read -r -a ctl <<<"${SUPERVISORCTL:-$ROOT/.venv/bin/supervisorctl -c $ROOT/.venv/etc/supervisord.conf}"
  pid=$("${ctl[@]}" pid "$daemon" 2>&1) || true
fi
if ! [[ $pid =~ ^[1-9][0-9]*$ ]] || [ ! -d "/proc/$pid" ]; then
  die "no running $daemon (supervisorctl: '${pid//$'\n'/ }'): start the bundle with \`make run\`, or pass PID=<pid>"
fi

mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
base="$out/$daemon-KIND-$stamp"

# $1 = the tool that failed; its own message has already been printed.
cannot_attach() {
  echo "profile: $1 could not attach to $daemon (pid $pid)" >&2
  return 3
}

# Printed once at the end, after any profile could not attach. $1 = the kinds that failed.
attach_help() {
  local scope target=${daemon}_$kind
  scope=$(cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null || echo "not set")
  [ "$kind" = all ] && target=${daemon}_profiles
  cat >&2 <<EOF

Attaching to a running process needs ptrace permission: root, or a user with
CAP_SYS_PTRACE, can attach to any process; an ordinary user can attach only to its own
processes, and with kernel.yama.ptrace_scope=1 (a common default; here: $scope) only to
processes it started itself. Run as root (sudo make $target), or start the daemon
under the profiler instead of attaching (stop it in supervisor first):
    py-spy record -o profiles/$daemon.svg -- .venv/bin/$daemon
    memray run -o profiles/$daemon.bin .venv/bin/$daemon && memray flamegraph profiles/$daemon.bin
EOF
  case " $1 " in *" heap "*)
    cat >&2 <<EOF
memray attach injects itself through gdb or lldb (apt-get install gdb lldb) and needs
memray importable in the daemon's environment. gdb fails on some kernels with
"Couldn't write extended state status"; lldb then works (MEMRAY_METHOD=lldb).
EOF
  esac
}

# Copy to the stable name: a copy, not a link, survives scp and shared folders.
latest() { cp -f "$1" "${1/$stamp/latest}"; echo "  ${1/$stamp/latest}"; }

profile_cpu() {
  local svg="${base/KIND/cpu}.svg" json="${base/KIND/cpu}.speedscope.json" rc=0
  echo "cpu: sampling $daemon (pid $pid) for ${seconds}s"
  # Two samplers side by side, one per output format, so the window is taken once.
  # --nonblocking reads the process's memory without pausing it, so the two do not
  # fight over ptrace and the daemon under load is not slowed by the profiler.
  # shellcheck disable=SC2086 # PYSPY_ARGS: extra options, split on purpose (e.g. "--idle -r 250")
  py-spy record --pid "$pid" --duration "$seconds" --nonblocking --format flamegraph \
    --output "$svg" ${PYSPY_ARGS:-} >"$svg.log" 2>&1 &
  local svg_job=$!
  # shellcheck disable=SC2086
  py-spy record --pid "$pid" --duration "$seconds" --nonblocking --format speedscope \
    --output "$json" ${PYSPY_ARGS:-} >"$json.log" 2>&1 || rc=$?
  wait "$svg_job" || rc=$?
  if [ "$rc" -ne 0 ]; then
    if grep -qs "No stack counts found" "$svg.log"; then
      rm -f "$svg" "$json" "$svg.log" "$json.log"
      die "cpu: no samples: $daemon was idle the whole time; load it (make loadtest) or set PYSPY_ARGS=--idle"
    fi
    grep -hv "^ *[0-9]*: \|^Stack backtrace:\|^$" "$svg.log" "$json.log" >&2 || true
    rm -f "$svg" "$json" "$svg.log" "$json.log"
    cannot_attach "py-spy record"
    return
  fi
  rm -f "$svg.log" "$json.log"
  echo "  $svg"
  echo "  $json"
  latest "$svg"
  latest "$json"
}

# True while the daemon holds a file whose path starts with $1 open (memray writes the
# capture, then compresses it, from inside the daemon).
holds_open() {
  local fd
  for fd in /proc/"$pid"/fd/*; do
    case $(readlink "$fd" 2>/dev/null) in "$1"*) return 0 ;; esac
  done
  return 1
}

profile_heap() {
  local bin html txt method rc=0 deadline
  bin=$(cd "$(dirname "$base")" && pwd)/$(basename "${base/KIND/heap}").bin
  html=${bin%.bin}.html txt=${bin%.bin}.txt
  method=${MEMRAY_METHOD:-auto}
  echo "heap: tracking allocations of $daemon (pid $pid) for ${seconds}s"
  memray attach --method "$method" --duration "$seconds" -f -o "$bin" "$pid" || rc=$?
  if [ "$rc" -ne 0 ] && [ "$method" = auto ] && command -v lldb >/dev/null; then
    echo "heap: memray attach ($method) failed; retrying through lldb" >&2
    rc=0
    memray attach --method lldb --duration "$seconds" -f -o "$bin" "$pid" || rc=$?
  fi
  [ "$rc" -eq 0 ] || { cannot_attach "memray attach"; return; }
  # The capture is complete once the daemon has closed it (twice in a row: the file is
  # closed, then reopened for compression).
  deadline=$((SECONDS + seconds + 60))
  while [ -d "/proc/$pid" ]; do
    if ! holds_open "$bin"; then
      sleep 0.2
      holds_open "$bin" || break
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "heap: $daemon still writes $bin after ${seconds}s + 60s"
    sleep 0.2
  done
  [ -s "$bin" ] || die "heap: no capture written ($daemon exited?)"
  memray flamegraph -f -o "$html" "$bin" >/dev/null
  memray stats "$bin" >"$txt"
  echo "  $bin"
  echo "  $html"
  echo "  $txt"
  latest "$bin"
  latest "$html"
  latest "$txt"
}

profile_stacks() {
  local txt="${base/KIND/stacks}.txt" rc=0 spy_rc=0
  echo "stacks: threads and asyncio tasks of $daemon (pid $pid)"
  {
    echo "# $daemon pid $pid at $stamp"
    echo
    echo "## threads (py-spy dump)"
    echo
  } >"$txt"
  py-spy dump --pid "$pid" >>"$txt" 2>"$txt.err" || spy_rc=$?
  {
    echo
    echo "## asyncio tasks and threads (the daemon's /debug/tasks)"
    echo
  } >>"$txt"
  # The profiling port answers without any privilege; take it even if py-spy could not.
  if ! "$PY" - "$daemon" "$port" >>"$txt" <<'EOF'; then
import sys, urllib.request
daemon, port = sys.argv[1], sys.argv[2]
from daemons.settings import ConsumerSettings, ProducerSettings, load
s = load(ConsumerSettings if daemon == "consumer" else ProducerSettings)
host = "127.0.0.1" if s.http_host in ("", "0.0.0.0", "::") else s.http_host
port = int(port or s.profiling_port)
if not port:
    sys.exit(f"profile: stacks: the {daemon}'s profiling port is off ({daemon.upper()}_PROFILING_PORT=0)")
url = f"http://{host}:{port}/debug/tasks"
try:
    with urllib.request.urlopen(url, timeout=10) as reply:
        sys.stdout.write(reply.read().decode())
except OSError as exc:
    sys.exit(f"profile: stacks: {url}: {exc}")
EOF
    rc=1
  fi
  echo "  $txt"
  latest "$txt"
  cat "$txt.err" >&2
  rm -f "$txt.err"
  [ "$spy_rc" -eq 0 ] || { cannot_attach "py-spy dump"; return; }
  return "$rc"
}

# Each profile in a subshell, so one that fails (die, set -e) does not stop the next.
# Not `( ... ) || ...`: that would switch set -e off inside the subshell.
status=0 unattached=""
[ "$kind" = all ] && kinds="stacks cpu heap" || kinds=$kind
for k in $kinds; do
  set +e
  (case $k in cpu) profile_cpu ;; heap) profile_heap ;; stacks) profile_stacks ;; esac)
  rc=$?
  set -e
  [ "$rc" -ne 3 ] || unattached="$unattached $k"
  [ "$rc" -le "$status" ] || status=$rc
done
[ -z "$unattached" ] || attach_help "$unattached"
exit "$status"
