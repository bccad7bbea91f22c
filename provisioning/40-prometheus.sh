#!/usr/bin/env bash
# Prometheus from Debian (prometheus.service) on the repository's conf/prometheus.yml,
# read from the VM's copy of conf/ that 30-app.sh renders (/opt/tasks/conf), so that
# its relative paths land in /opt/tasks/var as with `make run`. It scrapes the daemons'
# /metrics on the VM's loopback. It listens on all interfaces of the VM, because port
# forwarding reaches the VM there; the host side of the forward is 127.0.0.1 only. (The
# repository's conf/prometheus.conf, Prometheus under supervisord, binds 127.0.0.1 only.)
# Its rule files (the alerts and the recording rules) are in that same copy of conf/.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONFIG=$TASKS_HOME/conf/prometheus.yml   # named in vm/prometheus.default
RULE_FILES=(recording.yml alerts.yml)    # its rule_files, next to it
changed=0
# --no-install-recommends (APT_OPTS): no node exporter listening on :9100.
apt_install prometheus
[[ -f $CONFIG ]] || die "$CONFIG is missing (30-app.sh renders $TASKS_HOME/conf)"
# promtool checks the rule files the configuration names too.
promtool check config "$CONFIG" >/dev/null || die "$CONFIG: promtool check config failed"
install_file "$VM_DIR/prometheus.default" /etc/default/prometheus 0644 root:root && changed=1
# A change of the configuration or of a rule file (in the repository) restarts Prometheus too.
write_file /etc/prometheus/tasks-config.sha256 0644 root:root \
  < <(cd "$(dirname "$CONFIG")" && sha256sum "$(basename "$CONFIG")" "${RULE_FILES[@]}") && changed=1
ensure_service prometheus "$changed"
wait_http http://127.0.0.1:9090/-/ready 60
