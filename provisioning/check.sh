#!/usr/bin/env bash
# The last step of `vagrant up` (and of every later `vagrant up`/`vagrant provision`):
# waits, at most CHECK_TIMEOUT seconds, until Prometheus reports both daemons up and
# tasks reaching `done`, and Grafana serves the Tasks dashboard as its home with a
# working Prometheus datasource; then prints where everything is. Exit 1 on timeout.
# By hand in the VM: sudo /opt/tasks/src/provisioning/check.sh
# Changes nothing. tests/system/test_vm_provisioning.py runs it against stand-in servers.
set -euo pipefail

PROMETHEUS_URL=${PROMETHEUS_URL:-http://127.0.0.1:9090}
GRAFANA_URL=${GRAFANA_URL:-http://127.0.0.1:3000}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-180}
CHECK_JOBS=${CHECK_JOBS:-producer consumer}   # the scrape jobs of conf/prometheus.yml
DASHBOARD_UID=tasks                           # provisioning/grafana/dashboards/tasks.json
DATASOURCE_UID=tasks-prometheus               # provisioning/grafana/datasources/*.yml
GRAFANA_ENV=${GRAFANA_ENV:-/etc/tasks/grafana.env}
if [[ -r $GRAFANA_ENV ]]; then
  # What provisioning set wins over the caller's GRAFANA_ADMIN_PASSWORD, which may have
  # changed since (it takes effect at the next `vagrant provision`).
  # shellcheck source=/dev/null  # written by 50-grafana.sh
  source "$GRAFANA_ENV"
fi
GRAFANA_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:-tasks-admin}

deadline=$((SECONDS + CHECK_TIMEOUT))
status="nothing checked yet"
body=$(mktemp)   # the last Grafana answer
trap 'rm -f "$body"' EXIT

fail() {
  printf 'check: FAILED: %s\n' "$1" >&2
  printf 'check: look at: sudo supervisorctl status; sudo journalctl -u tasks-supervisord -u prometheus -u grafana-server\n' >&2
  exit 1
}

# wait_for DESCRIPTION FUNCTION: retry FUNCTION until it succeeds or the deadline; the
# function explains itself in $status.
wait_for() {
  until "$2"; do
    ((SECONDS < deadline)) || fail "$1 within ${CHECK_TIMEOUT}s (last: $status)"
    sleep 2
  done
  printf 'check: %s\n' "$1"
}

jobs_up() {
  local targets job health
  targets=$(curl -fsS --max-time 5 "$PROMETHEUS_URL/api/v1/targets?state=active" 2>&1) \
    || { status="Prometheus: $targets"; return 1; }
  for job in $CHECK_JOBS; do
    health=$(jq -r --arg job "$job" '[.data.activeTargets[] | select(.labels.job == $job) | .health]
      | if length == 0 then "absent" elif all(. == "up") then "up" else "down" end' <<<"$targets")
    [[ $health == up ]] || { status="Prometheus: job $job is $health"; return 1; }
  done
}

tasks_done() {
  local answer done_
  answer=$(curl -fsS --max-time 5 "$PROMETHEUS_URL/api/v1/query" \
    --data-urlencode 'query=sum(tasks_done_total)' 2>&1) || { status="Prometheus: $answer"; return 1; }
  done_=$(jq -r '.data.result[0].value[1] // "0"' <<<"$answer")
  status="sum(tasks_done_total) = $done_"
  [[ $done_ != 0 ]]
}

# grafana PATH: GET with the admin's basic auth (given on stdin, not on the command
# line); the answer goes to $body. A rejected password fails at once: retrying would
# only lock the account.
grafana() {
  local code
  code=$(curl -sS --max-time 5 -o "$body" -w '%{http_code}' -K - "$GRAFANA_URL$1" \
    <<<"user = \"admin:$GRAFANA_ADMIN_PASSWORD\"" 2>/dev/null) || code=000
  [[ $code != 401 ]] || fail "Grafana rejects admin's password (GRAFANA_ADMIN_PASSWORD)"
  status="Grafana $1: HTTP $code"
  [[ $code == 200 ]]
}

dashboard_served() {
  grafana "/api/dashboards/uid/$DASHBOARD_UID" || return 1
  [[ $(jq -r .dashboard.title "$body") == Tasks ]] || { status="dashboard $DASHBOARD_UID: title is not Tasks"; return 1; }
  grafana /api/dashboards/home || return 1
  [[ $(jq -r .dashboard.uid "$body") == "$DASHBOARD_UID" ]] || { status="the home dashboard is not Tasks"; return 1; }
}

datasource_ok() {
  grafana "/api/datasources/uid/$DATASOURCE_UID/health" || return 1
  [[ $(jq -r .status "$body") == OK ]] || { status="datasource: $(jq -c . "$body")"; return 1; }
}

wait_for "Prometheus reports ${CHECK_JOBS// / and } up" jobs_up
wait_for "tasks are reaching done" tasks_done
wait_for "Grafana serves the Tasks dashboard as its home" dashboard_served
wait_for "Grafana's datasource $DATASOURCE_UID reaches Prometheus" datasource_ok

cat <<EOT

The tasks stack is up. On this host (127.0.0.1 only):
  Grafana     http://127.0.0.1:${HOST_GRAFANA_PORT:-3000}/    login admin / $GRAFANA_ADMIN_PASSWORD (home: the Tasks dashboard)
  Prometheus  http://127.0.0.1:${HOST_PROMETHEUS_PORT:-9090}/   targets: $CHECK_JOBS
EOT
if [[ ${VM_GRPC_OPEN:-0} == 1 ]]; then
  echo "  consumer    127.0.0.1:${HOST_GRPC_PORT:-50051} (gRPC: tasks.v1.Consumer, grpc.health.v1; token: the host's in /etc/tasks/grpc.env)"
else
  echo "  consumer    gRPC on the VM's loopback only (VM_GRPC_OPEN=1 vagrant provision opens it, with a token)"
fi
if [[ ${PGADMIN:-0} == 1 ]]; then
  echo "  pgAdmin     http://127.0.0.1:${HOST_PGADMIN_PORT:-15080}/   login ${PGADMIN_EMAIL:-admin@example.com} / ${PGADMIN_PASSWORD:-tasks-admin} (server 'tasks'; its password: see db.env below)"
fi
cat <<'EOT'
In the VM:
  vagrant ssh -c 'sudo supervisorctl status'        producer, consumer (and the one-shot migrate)
  vagrant ssh -c 'sudo cat /etc/tasks/db.env'       DATABASE_URL of the tasks database (PostgreSQL 15, VM-local)
  vagrant ssh -c 'sudo tail -f /opt/tasks/var/log/consumer.log'
EOT
