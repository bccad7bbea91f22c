#!/usr/bin/env bash
# Grafana from Grafana's apt repository, provisioned from provisioning/grafana/: the
# Prometheus datasource (uid tasks-prometheus) and the "Tasks" dashboard, which is also
# the home dashboard. Admin password: GRAFANA_ADMIN_PASSWORD (default tasks-admin), kept
# in /etc/tasks/grafana.env (root only) for check.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GRAFANA_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:-tasks-admin}
KEYRING=/etc/apt/keyrings/grafana.gpg
GRAFANA_SRC=$TASKS_SRC/provisioning/grafana
DASHBOARDS_DIR=/var/lib/grafana/dashboards   # the file provider's path (dashboards.yml)
changed=0

# It is kept in a file that shell scripts source, and given to curl in quotes.
[[ $GRAFANA_ADMIN_PASSWORD =~ ^[A-Za-z0-9._@%+=:,/~^-]{4,}$ ]] \
  || die "invalid GRAFANA_ADMIN_PASSWORD: accepted: 4 or more of A-Z a-z 0-9 . _ @ % + = : , / ~ ^ -"

ensure_dir /etc/apt/keyrings 0755 root:root
if [[ ! -s $KEYRING ]]; then
  curl -fsSL https://apt.grafana.com/gpg.key | gpg --dearmor --yes -o "$KEYRING"
  chmod 0644 "$KEYRING"
  log "added Grafana's apt key"
fi
if write_file /etc/apt/sources.list.d/grafana.list 0644 root:root <<EOT
deb [signed-by=$KEYRING] https://apt.grafana.com stable main
EOT
then
  apt-get update -qq
fi
apt_install grafana

install_file "$VM_DIR/grafana.ini" /etc/grafana/grafana.ini 0640 root:grafana && changed=1
for ds in "$GRAFANA_SRC"/datasources/*.yml; do
  install_file "$ds" "/etc/grafana/provisioning/datasources/$(basename "$ds")" 0640 root:grafana \
    && changed=1
done
install_file "$GRAFANA_SRC/dashboards/dashboards.yml" \
  /etc/grafana/provisioning/dashboards/dashboards.yml 0640 root:grafana && changed=1
ensure_dir "$DASHBOARDS_DIR" 0755 root:grafana
for dash in "$GRAFANA_SRC"/dashboards/*.json; do
  install_file "$dash" "$DASHBOARDS_DIR/$(basename "$dash")" 0644 root:grafana && changed=1
done
ensure_service grafana-server "$changed"
wait_http http://127.0.0.1:3000/api/health 120

# Grafana creates `admin` with its own default password on first start; set ours when
# it does not work yet (the password goes on stdin, never on a command line).
curl_admin() {
  curl -fsS -o /dev/null --max-time 10 -K - "$@" <<<"user = \"admin:$GRAFANA_ADMIN_PASSWORD\""
}
if ! curl_admin http://127.0.0.1:3000/api/user; then
  (cd / && runuser -u grafana -- grafana cli --homepath /usr/share/grafana \
    --config /etc/grafana/grafana.ini admin reset-admin-password --password-from-stdin \
    <<<"$GRAFANA_ADMIN_PASSWORD") >/dev/null
  curl_admin http://127.0.0.1:3000/api/user || die "Grafana rejects the admin password just set"
  log "set Grafana's admin password"
fi
write_file "$TASKS_ETC/grafana.env" 0600 root:root <<EOT || true
GRAFANA_ADMIN_PASSWORD=$GRAFANA_ADMIN_PASSWORD
EOT
