# shellcheck shell=bash disable=SC2034  # the variables are used by the stages
# Shared by the provisioning stages (sourced, not run). Every helper converges: it acts
# only when the machine differs from what is wanted and reports what it changed, so a
# second `vagrant provision` changes nothing.

# Where things live in the VM. The repository is synced (rsync) to $TASKS_SRC; the
# daemons run from $TASKS_HOME: venv/, conf/ (a copy of the repository's conf/) and var/.
TASKS_SRC=${TASKS_SRC:-/opt/tasks/src}
TASKS_HOME=${TASKS_HOME:-/opt/tasks}
TASKS_VENV=$TASKS_HOME/venv
TASKS_ETC=/etc/tasks        # root-only: secrets and the daemons' environment
TASKS_USER=tasks            # the daemons' system user (supervisord runs as it)
VM_DIR=$TASKS_SRC/provisioning/vm

export DEBIAN_FRONTEND=noninteractive
# Keep our copies of packaged config files on upgrades instead of prompting.
APT_OPTS=(-y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

log() { printf '==> [%s] %s\n' "${STAGE:-provision}" "$*"; }
die() { printf '==> [%s] ERROR: %s\n' "${STAGE:-provision}" "$*" >&2; exit 1; }

# Install the Debian packages that are missing; `apt-get update` only when there are.
apt_install() {
  local pkg missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
      || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install "${APT_OPTS[@]}" "${missing[@]}"
  fi
}

# "644 root:root" for 0644 root:root, as `stat -c '%a %U:%G'` prints it.
_mode_owner() { printf '%o %s' "$((8#$1))" "$2"; }

# install_file SRC DEST [MODE] [OWNER:GROUP]: copy when the content, mode or owner
# differs. Returns 0 when it changed something, 1 when DEST was already right. (Callers
# test the status, which turns `set -e` off inside: hence the explicit `|| die`.)
install_file() {
  local src=$1 dest=$2 mode=${3:-0644} owner=${4:-root:root}
  [[ -f $src ]] || die "missing file: $src"
  if [[ -f $dest ]] && cmp -s "$src" "$dest" \
     && [[ $(stat -c '%a %U:%G' "$dest") == "$(_mode_owner "$mode" "$owner")" ]]; then
    return 1
  fi
  install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$src" "$dest" \
    || die "cannot install $dest"
  log "installed $dest"
}

# write_file DEST MODE OWNER:GROUP < content: like install_file, from standard input.
write_file() {
  local dest=$1 mode=$2 owner=$3 tmp rc=0
  tmp=$(mktemp) || die "mktemp failed"
  cat >"$tmp" || die "cannot write $tmp"
  install_file "$tmp" "$dest" "$mode" "$owner" || rc=$?
  rm -f "$tmp"
  return "$rc"
}

# ensure_dir PATH MODE OWNER:GROUP
ensure_dir() {
  local path=$1 mode=$2 owner=$3
  if [[ -d $path && $(stat -c '%a %U:%G' "$path") == "$(_mode_owner "$mode" "$owner")" ]]; then
    return 0
  fi
  install -d -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$path"
  log "directory $path"
}

# ensure_system_user NAME HOME
ensure_system_user() {
  id -u "$1" >/dev/null 2>&1 && return 0
  useradd --system --user-group --home-dir "$2" --no-create-home --shell /usr/sbin/nologin "$1"
  log "system user $1"
}

# ensure_service UNIT CHANGED: enable and start UNIT; restart it when CHANGED is 1.
ensure_service() {
  local unit=$1 changed=$2
  systemctl is-enabled --quiet "$unit" 2>/dev/null || { systemctl enable --quiet "$unit"; log "enabled $unit"; }
  if ! systemctl is-active --quiet "$unit"; then
    systemctl start "$unit"
    log "started $unit"
  elif [[ $changed == 1 ]]; then
    systemctl restart "$unit"
    log "restarted $unit"
  fi
}

# wait_http URL SECONDS: until URL answers 2xx, or fail after SECONDS.
wait_http() {
  local url=$1 deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null --max-time 5 "$url" 2>/dev/null; do
    ((SECONDS < deadline)) || die "$url did not answer within $2 s"
    sleep 1
  done
}
