#!/usr/bin/env bash
# `vagrant up` / `vagrant provision` run this as root in the VM (Debian 12). It runs the
# stages NN-*.sh of the synced repository in order; each converges, so running it again
# changes nothing. Re-run by hand in the VM: sudo /opt/tasks/src/provisioning/provision.sh
#
# Settings (from the Vagrantfile's environment; defaults in parentheses):
#   TASKS_SRC               the synced repository (/opt/tasks/src)
#   GRAFANA_ADMIN_PASSWORD  Grafana's `admin` password (tasks-admin)
#   PGADMIN                 1 = install pgAdmin 4 on port 15080 (0)
#   PGADMIN_EMAIL, PGADMIN_PASSWORD   pgAdmin login (admin@example.com / tasks-admin)
set -euo pipefail

TASKS_SRC=${TASKS_SRC:-/opt/tasks/src}
export TASKS_SRC
[[ $(id -u) == 0 ]] || { echo "provision.sh: run as root" >&2; exit 1; }
[[ -f $TASKS_SRC/pyproject.toml ]] \
  || { echo "provision.sh: the repository is not at $TASKS_SRC (vagrant rsync?)" >&2; exit 1; }

for stage in "$TASKS_SRC"/provisioning/[0-9][0-9]-*.sh; do
  STAGE=$(basename "$stage" .sh) bash "$stage"
done
