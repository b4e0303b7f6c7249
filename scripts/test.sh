#!/usr/bin/env bash
# The test command: install everything, start S3 (SeaweedFS), SFTP (OpenSSH), GCS (fake-gcs-server) and
# PostgreSQL on 127.0.0.1, run pytest (extra arguments are passed to it), stop the servers by PID whatever happens.
# A server that cannot start fails the run: tests that need a server never skip.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
"$ROOT/scripts/install.sh"
STATE=${FILEFEED_SERVERS_STATE:-$ROOT/.servers}
trap '"$ROOT/scripts/servers.sh" stop "$STATE" >/dev/null || true' EXIT
"$ROOT/scripts/servers.sh" start "$STATE" >/dev/null
export FILEFEED_SERVERS_ENV="$STATE/env"
$PY -m pytest "$@"
