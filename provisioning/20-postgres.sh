#!/usr/bin/env bash
# PostgreSQL 15 from Debian, on localhost only (Debian's default), with a role and a
# database `tasks`. The role's password is generated on the first run and kept in
# /etc/tasks/db.env (root only, mode 600) as DATABASE_URL; it is never in the repository.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DB_ENV=$TASKS_ETC/db.env
DB_NAME=tasks
DB_ROLE=tasks

apt_install postgresql
[[ -d /etc/postgresql/15/main ]] || die "expected the PostgreSQL 15 cluster of Debian 12 (/etc/postgresql/15/main)"
systemctl is-enabled --quiet postgresql || systemctl enable --quiet postgresql
systemctl is-active --quiet postgresql@15-main || systemctl start postgresql@15-main

# psql as the postgres superuser (peer authentication on the local socket); SQL on stdin
# so that no password ever appears on a command line.
as_postgres() { (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -At "$@"); }

for _ in $(seq 1 30); do as_postgres -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
port=$(as_postgres -c 'SHOW port')

if [[ -f $DB_ENV ]]; then
  # shellcheck disable=SC1090  # written below
  url=$(set -a && source "$DB_ENV" && printf '%s' "$DATABASE_URL")
  password=${url#postgresql://"$DB_ROLE":}
  password=${password%%@*}
else
  password=$(openssl rand -hex 24)
fi
url="postgresql://$DB_ROLE:$password@127.0.0.1:$port/$DB_NAME"
write_file "$DB_ENV" 0600 root:root <<EOT || true
# PostgreSQL of the tasks daemons; written by provisioning/20-postgres.sh (password generated once).
DATABASE_URL=$url
EOT

if [[ -z $(as_postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_ROLE'") ]]; then
  printf "CREATE ROLE %s LOGIN PASSWORD '%s';\n" "$DB_ROLE" "$password" | as_postgres
  log "created role $DB_ROLE"
elif ! PGPASSWORD=$password PGCONNECT_TIMEOUT=5 psql -X -q -At -h 127.0.0.1 -p "$port" \
      -U "$DB_ROLE" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
  printf "ALTER ROLE %s LOGIN PASSWORD '%s';\n" "$DB_ROLE" "$password" | as_postgres
  log "reset the password of role $DB_ROLE (to the one in $DB_ENV)"
fi
if [[ -z $(as_postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") ]]; then
  as_postgres -c "CREATE DATABASE $DB_NAME OWNER $DB_ROLE"
  log "created database $DB_NAME"
fi
