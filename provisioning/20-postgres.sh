#!/usr/bin/env bash
# PostgreSQL 15 from Debian, on localhost only (Debian's default), with a database
# `tasks` and two roles, neither a superuser: `tasks` owns the database and is the
# migrator's; `tasks_app` is the daemons', which the migrator makes owner of the tables
# (maintenance makes, detaches and drops partitions) and nothing more. Their passwords
# are generated on the first run and kept in /etc/tasks/db.env (root only, mode 600) as
# MIGRATOR_DATABASE_URL and DATABASE_URL; they are never in the repository.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DB_ENV=$TASKS_ETC/db.env
DB_NAME=tasks
OWNER_ROLE=tasks
APP_ROLE=tasks_app

apt_install postgresql
[[ -d /etc/postgresql/15/main ]] || die "expected the PostgreSQL 15 cluster of Debian 12 (/etc/postgresql/15/main)"
systemctl is-enabled --quiet postgresql || systemctl enable --quiet postgresql
systemctl is-active --quiet postgresql@15-main || systemctl start postgresql@15-main

# psql as the postgres superuser (peer authentication on the local socket); SQL on stdin
# so that no password ever appears on a command line.
as_postgres() { (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -At "$@"); }

for _ in $(seq 1 30); do as_postgres -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
port=$(as_postgres -c 'SHOW port')

# The password of role $2 in the URL held by variable $1 of db.env, if it is there.
password_in_db_env() {
  [[ -f $DB_ENV ]] || return 0
  local url
  # shellcheck disable=SC1090  # written below
  url=$(set -a && source "$DB_ENV" && printf '%s' "${!1:-}")
  [[ $url == postgresql://"$2":* ]] || return 0
  url=${url#postgresql://"$2":}
  printf '%s' "${url%%@*}"
}
owner_password=$(password_in_db_env MIGRATOR_DATABASE_URL "$OWNER_ROLE")
# Before the split, the daemons connected as the owner, with DATABASE_URL.
[[ -n $owner_password ]] || owner_password=$(password_in_db_env DATABASE_URL "$OWNER_ROLE")
[[ -n $owner_password ]] || owner_password=$(openssl rand -hex 24)
app_password=$(password_in_db_env DATABASE_URL "$APP_ROLE")
[[ -n $app_password ]] || app_password=$(openssl rand -hex 24)
write_file "$DB_ENV" 0600 root:root <<EOT || true
# PostgreSQL of the tasks daemons; written by provisioning/20-postgres.sh (passwords generated once).
# The daemons: role $APP_ROLE (owns the tables, no superuser).
DATABASE_URL=postgresql://$APP_ROLE:$app_password@127.0.0.1:$port/$DB_NAME
# The migrator: role $OWNER_ROLE (owns the database), handing what it makes to $APP_ROLE.
MIGRATOR_DATABASE_URL=postgresql://$OWNER_ROLE:$owner_password@127.0.0.1:$port/$DB_NAME
MIGRATOR_APP_ROLE=$APP_ROLE
EOT

# A login role, no superuser, that can create neither roles nor databases, with this
# password (set again when it no longer logs in with it).
ensure_role() {
  local role=$1 password=$2
  if [[ -z $(as_postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$role'") ]]; then
    printf "CREATE ROLE %s LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '%s';\n" \
      "$role" "$password" | as_postgres
    log "created role $role"
  elif ! PGPASSWORD=$password PGCONNECT_TIMEOUT=5 psql -X -q -At -h 127.0.0.1 -p "$port" \
        -U "$role" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    printf "ALTER ROLE %s LOGIN PASSWORD '%s';\n" "$role" "$password" | as_postgres
    log "reset the password of role $role (to the one in $DB_ENV)"
  fi
}
ensure_role "$OWNER_ROLE" "$owner_password"
ensure_role "$APP_ROLE" "$app_password"
# ALTER ... OWNER TO tasks_app, which the migrator runs, needs the owner to be a member.
if [[ -z $(as_postgres -c "SELECT 1 FROM pg_auth_members WHERE roleid = '$APP_ROLE'::regrole AND member = '$OWNER_ROLE'::regrole") ]]; then
  as_postgres -c "GRANT $APP_ROLE TO $OWNER_ROLE"
  log "granted $APP_ROLE to $OWNER_ROLE"
fi
if [[ -z $(as_postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") ]]; then
  as_postgres -c "CREATE DATABASE $DB_NAME OWNER $OWNER_ROLE"
  log "created database $DB_NAME"
fi
