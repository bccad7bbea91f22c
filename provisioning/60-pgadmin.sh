#!/usr/bin/env bash
# pgAdmin 4 (server mode), only with PGADMIN=1: the PyPI package in its own venv under
# /opt/pgadmin, served by gunicorn on port 15080 as the system user `pgadmin`, with the
# tasks database registered. Login: PGADMIN_EMAIL / PGADMIN_PASSWORD. Without the flag,
# a pgAdmin installed by an earlier run is stopped and disabled.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

UNIT=pgadmin4.service
PGADMIN_HOME=/opt/pgadmin
PGADMIN_VENV=$PGADMIN_HOME/venv
PGADMIN_DATA=/var/lib/pgadmin
# The versions this was tried with; PGADMIN_PIP overrides.
PGADMIN_PIP=${PGADMIN_PIP:-pgadmin4==9.18 gunicorn==27.0.1}
PGADMIN_EMAIL=${PGADMIN_EMAIL:-admin@example.com}
PGADMIN_PASSWORD=${PGADMIN_PASSWORD:-tasks-admin}

if [[ ${PGADMIN:-0} != 1 ]]; then
  if systemctl is-enabled --quiet "$UNIT" 2>/dev/null || systemctl is-active --quiet "$UNIT" 2>/dev/null; then
    systemctl disable --now --quiet "$UNIT"
    log "PGADMIN is not 1: stopped and disabled $UNIT"
  fi
  exit 0
fi
((${#PGADMIN_PASSWORD} >= 6)) || die "PGADMIN_PASSWORD: pgAdmin wants at least 6 characters"

changed=0
ensure_system_user pgadmin "$PGADMIN_DATA"
ensure_dir "$PGADMIN_HOME" 0755 root:root
ensure_dir "$PGADMIN_DATA" 0700 pgadmin:pgadmin
ensure_dir /var/log/pgadmin 0750 pgadmin:pgadmin
if [[ ! -x $PGADMIN_VENV/bin/python ]]; then
  /usr/bin/python3 -m venv "$PGADMIN_VENV"
  log "created $PGADMIN_VENV"
fi
read -r -a pip_specs <<<"$PGADMIN_PIP"
if [[ ! -f $PGADMIN_VENV/.installed || $(cat "$PGADMIN_VENV/.installed") != "$PGADMIN_PIP" ]]; then
  log "pip install $PGADMIN_PIP"
  "$PGADMIN_VENV/bin/pip" install --quiet --disable-pip-version-check "${pip_specs[@]}"
  echo "$PGADMIN_PIP" >"$PGADMIN_VENV/.installed"
  changed=1
fi
# A fixed path for the unit: the package's directory inside the venv (pgadmin4 is a
# namespace package: no __file__).
app_dir=$("$PGADMIN_VENV/bin/python" -c 'import pgadmin4; print(next(iter(pgadmin4.__path__)))')
if [[ $(readlink "$PGADMIN_HOME/app" 2>/dev/null) != "$app_dir" ]]; then
  ln -sfn "$app_dir" "$PGADMIN_HOME/app"
  changed=1
fi
install_file "$VM_DIR/pgadmin/config_system.py" /etc/pgadmin/config_system.py 0644 root:root && changed=1

# setup.py as the pgadmin user; the setup-db credentials go through the environment.
pgadmin_setup() {
  (cd / && runuser -u pgadmin -- "$PGADMIN_VENV/bin/python" "$PGADMIN_HOME/app/setup.py" "$@")
}
# Creates the configuration database and the first user when there is none yet;
# otherwise only upgrades its schema when pgAdmin is newer.
PGADMIN_SETUP_EMAIL=$PGADMIN_EMAIL PGADMIN_SETUP_PASSWORD=$PGADMIN_PASSWORD \
  pgadmin_setup setup-db >/dev/null 2>&1 || die "pgAdmin setup-db failed"

# The login and the registered server: applied when they differ from the last run's.
port=$(cd / && runuser -u postgres -- psql -X -At -c 'SHOW port')
servers=$(
  cat <<EOT
{"Servers": {"1": {"Name": "tasks", "Group": "Servers", "Host": "127.0.0.1",
  "Port": $port, "MaintenanceDB": "tasks", "Username": "tasks", "SSLMode": "prefer"}}}
EOT
)
marker=$(printf '%s\n%s\n%s\n' "$PGADMIN_EMAIL" "$PGADMIN_PASSWORD" "$servers" | sha256sum | cut -d' ' -f1)
if [[ ! -f $PGADMIN_DATA/.provisioned || $(cat "$PGADMIN_DATA/.provisioned") != "$marker" ]]; then
  if [[ $(pgadmin_setup get-users --username "$PGADMIN_EMAIL" --json 2>/dev/null) == "[]" ]]; then
    pgadmin_setup add-user "$PGADMIN_EMAIL" "$PGADMIN_PASSWORD" --admin >/dev/null 2>&1
  else
    pgadmin_setup update-user "$PGADMIN_EMAIL" --password "$PGADMIN_PASSWORD" --admin >/dev/null 2>&1
  fi
  servers_file=$(mktemp)
  printf '%s\n' "$servers" >"$servers_file"
  chmod 0644 "$servers_file"
  pgadmin_setup load-servers "$servers_file" --user "$PGADMIN_EMAIL" --replace >/dev/null 2>&1
  rm -f "$servers_file"
  printf '%s\n' "$marker" >"$PGADMIN_DATA/.provisioned"
  chmod 0600 "$PGADMIN_DATA/.provisioned"
  log "pgAdmin login $PGADMIN_EMAIL and the server 'tasks' registered"
fi

if install_file "$VM_DIR/pgadmin/$UNIT" "/etc/systemd/system/$UNIT" 0644 root:root; then
  systemctl daemon-reload
  changed=1
fi
ensure_service "$UNIT" "$changed"
wait_http http://127.0.0.1:15080/misc/ping 120
