#!/usr/bin/env bash
# Base packages every later stage uses, and the root-only directory for the secrets and
# the daemons' environment.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

apt_install ca-certificates curl gnupg git jq python3-venv rsync
ensure_dir "$TASKS_ETC" 0700 root:root
