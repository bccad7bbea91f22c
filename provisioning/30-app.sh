#!/usr/bin/env bash
# The daemons: the repository installed into a venv under /opt/tasks (a real
# `pip install`, not an editable one), the migrations applied, and supervisord as a
# systemd service (tasks-supervisord) running the repository's own conf/supervisord.conf
# as the system user `tasks`. Reinstalls and restarts only when something changed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

UNIT=tasks-supervisord.service
SUPERVISOR_CONF=$TASKS_VENV/etc/supervisord.conf   # where the venv's supervisorctl looks
STAMP=$TASKS_VENV/.installed-from                  # fingerprint of the installed source
changed=0

ensure_system_user "$TASKS_USER" "$TASKS_HOME"
ensure_dir "$TASKS_HOME" 0755 root:root
# var/ can be crossed by others (0751) for var/prometheus, where conf/prometheus.yml
# looks for extra scrape targets (none in the VM: one consumer, one producer).
ensure_dir "$TASKS_HOME/var" 0751 "$TASKS_USER:$TASKS_USER"
ensure_dir "$TASKS_HOME/var/log" 0750 "$TASKS_USER:$TASKS_USER"
ensure_dir "$TASKS_HOME/var/run" 0750 "$TASKS_USER:$TASKS_USER"
ensure_dir "$TASKS_HOME/var/prometheus" 0755 "$TASKS_USER:$TASKS_USER"

if [[ ! -x $TASKS_VENV/bin/python ]]; then
  /usr/bin/python3 -m venv "$TASKS_VENV"   # Debian's (python3-venv), whatever else is on PATH
  log "created $TASKS_VENV"
fi

# pip reinstalls a local directory every time, so compare a fingerprint of what goes
# into the wheel (and of the commit, which gives the version) with the installed one.
# Git refuses a repository owned by another user (the synced copy is vagrant's) unless
# it is marked safe; the environment does that for this command only.
export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0="$TASKS_SRC"
fingerprint=$(
  cd "$TASKS_SRC"
  git rev-parse HEAD 2>/dev/null || echo "no git"
  find pyproject.toml README.md daemons schema -type f \
    ! -name '*.pyc' ! -path 'daemons/_version.py' -print0 | sort -z | xargs -0 sha256sum
)
fingerprint=$(sha256sum <<<"$fingerprint" | cut -d' ' -f1)
if [[ ! -f $STAMP || $(cat "$STAMP") != "$fingerprint" ]]; then
  log "pip install $TASKS_SRC into $TASKS_VENV"
  "$TASKS_VENV/bin/pip" install --quiet --disable-pip-version-check "$TASKS_SRC"
  echo "$fingerprint" >"$STAMP"
  changed=1
fi

# Migrations now, so that a broken one fails provisioning; supervisor's `migrate`
# program repeats `migrator up` at each start (a no-op then).
# shellcheck source=/dev/null  # written by 20-postgres.sh
(set -a && source "$TASKS_ETC/db.env" && "$TASKS_VENV/bin/migrator" up)

# The supervisord configuration: rendered from the repository's conf/ (one source).
rendered=$("$TASKS_SRC/provisioning/render-supervisor.sh" "$TASKS_VENV/bin/python" \
  "$TASKS_SRC" "$TASKS_HOME" "$SUPERVISOR_CONF")
if [[ -n $rendered ]]; then
  while IFS= read -r line; do log "$line"; done <<<"$rendered"
  changed=1
fi

install_file "$VM_DIR/tasks.env" "$TASKS_ETC/tasks.env" 0644 root:root && changed=1
# gRPC for the host (VM_GRPC_OPEN=1): on every interface of the VM, with bearer tokens,
# generated once and kept (root only): one for the producer, one for clients on the host.
GRPC_ENV=$TASKS_ETC/grpc.env
if [[ ${VM_GRPC_OPEN:-0} == 1 ]]; then
  token_in_grpc_env() {  # the token named $1 in CONSUMER_AUTH_TOKENS, if it is there
    [[ -f $GRPC_ENV ]] || return 0
    local tokens
    # shellcheck disable=SC1090  # written below
    tokens=$(set -a && source "$GRPC_ENV" && printf '%s' "${CONSUMER_AUTH_TOKENS:-}")
    tr ',' '\n' <<<"$tokens" | sed -n "s/^$1://p"
  }
  producer_token=$(token_in_grpc_env producer)
  [[ -n $producer_token ]] || producer_token=$(openssl rand -hex 24)
  host_token=$(token_in_grpc_env host)
  [[ -n $host_token ]] || host_token=$(openssl rand -hex 24)
  write_file "$GRPC_ENV" 0600 root:root <<EOT && changed=1
# Written by provisioning/30-app.sh with VM_GRPC_OPEN=1: gRPC open to the host, tokens
# required. From the host: grpcurl -H "authorization: Bearer <the host token>" ...
CONSUMER_LISTEN=0.0.0.0:50051
CONSUMER_AUTH_TOKENS=producer:$producer_token,host:$host_token
PRODUCER_AUTH_TOKEN=$producer_token
EOT
else
  write_file "$GRPC_ENV" 0600 root:root <<EOT && changed=1
# Written by provisioning/30-app.sh: gRPC on the VM's loopback only (tasks.env);
# VM_GRPC_OPEN=1 opens it to the host, with tokens.
EOT
fi
# `sudo supervisorctl ...` (sudo's PATH has /usr/local/bin) talks to this supervisord.
install_file "$VM_DIR/supervisorctl" /usr/local/bin/supervisorctl 0755 root:root || true
if install_file "$VM_DIR/$UNIT" "/etc/systemd/system/$UNIT" 0644 root:root; then
  systemctl daemon-reload
  changed=1
fi
ensure_service "$UNIT" "$changed"
