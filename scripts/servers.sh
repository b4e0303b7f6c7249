#!/usr/bin/env bash
# Start/stop the real test servers filefeed's sink tests and bench use, all on 127.0.0.1:
#   S3   SeaweedFS `weed mini`     12000-12004 (+ gRPC 22000-22004)   bucket filefeed-test
#   SFTP OpenSSH sshd (chrooted)   12222, user filefeedsftp, key-only, chroot /srv/filefeed-sftp-test
#   GCS  fake-gcs-server           14443                              bucket filefeed-test
#   PostgreSQL (Debian's)          15432                              database filefeed, role filefeed (no superuser)
# Usage: scripts/servers.sh start [STATE_DIR]   -> writes KEY=VALUE lines to STATE_DIR/env (default .servers/env)
#        scripts/servers.sh stop  [STATE_DIR]   -> SIGTERM each server by PID, wait, SIGKILL; safe to call twice
#        scripts/servers.sh status [STATE_DIR]
# Ports can be moved with S3_PORT, SFTP_PORT, GCS_PORT, PG_PORT. Start fails (non-zero, server log printed) if any server
# does not come up, after stopping the ones it had started.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CMD=${1:-}
STATE=${2:-$ROOT/.servers}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
ENV_FILE=$STATE/env

# name of the binary each PID must run: a PID recorded long ago may belong to another process now
expected_comm() { case "$1" in S3_PID) echo weed ;; SFTP_PID) echo sshd ;; GCS_PID) echo fake-gcs-server ;; PG_PID) echo postgres ;; esac; }
# PostgreSQL's SIGTERM waits for every client to disconnect; SIGINT is its fast shutdown (clients cut, data safe)
stop_signal() { case "$1" in PG_PID) echo INT ;; *) echo TERM ;; esac; }

pid_is() {  # pid_is PID COMM: true when PID is alive and runs COMM
  local pid=$1 comm=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$comm"
}

stop_pid() {  # stop_pid VAR PID
  local var=$1 pid=$2 comm
  comm=$(expected_comm "$var")
  pid_is "$pid" "$comm" || return 0
  kill -"$(stop_signal "$var")" "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do pid_is "$pid" "$comm" || return 0; sleep 0.1; done   # up to 15 s (weed takes 3-4 s)
  echo "servers.sh: $var=$pid ($comm) ignored SIGTERM, sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do pid_is "$pid" "$comm" || return 0; sleep 0.1; done
  echo "servers.sh: $var=$pid still alive" >&2; return 1
}

stop_all() {
  [ -f "$ENV_FILE" ] || return 0
  local rc=0 line var pid
  while IFS= read -r line; do
    case "$line" in *_PID=*) var=${line%%=*}; pid=${line#*=}; stop_pid "$var" "$pid" || rc=1 ;; esac
  done <"$ENV_FILE"
  # sshd forks one process per connection; they end with their clients, but do not leave them behind
  [ $rc -ne 0 ] || rm -f "$ENV_FILE"
  return $rc
}

all_alive() {
  [ -f "$ENV_FILE" ] || return 1
  local n=0 line var
  while IFS= read -r line; do
    case "$line" in *_PID=*) var=${line%%=*}; pid_is "${line#*=}" "$(expected_comm "$var")" || return 1; n=$((n + 1)) ;; esac
  done <"$ENV_FILE"
  [ $n -eq 4 ]
}

start_all() {
  if all_alive; then echo "servers.sh: already running ($ENV_FILE)" >&2; cat "$ENV_FILE"; return 0; fi
  stop_all   # a half-started previous run
  local tmp=$ENV_FILE.partial
  : >"$tmp"; chmod 600 "$tmp"
  # record each server's lines as soon as it is up, so a later failure can still stop it
  run() {
    local out
    if ! out=$("$@"); then
      echo "servers.sh: $1 failed" >&2
      mv "$tmp" "$ENV_FILE"; stop_all || true; rm -f "$ENV_FILE"
      exit 1
    fi
    printf '%s\n' "$out" >>"$tmp"
  }
  run env S3_STATE_DIR="$STATE/s3" S3_PORT="${S3_PORT:-12000}" "$HERE/start-s3.sh"
  run env SFTP_STATE_DIR="$STATE/sftp" SFTP_PORT="${SFTP_PORT:-12222}" "$HERE/start-sftp.sh"
  run env GCS_STATE_DIR="$STATE/gcs" GCS_PORT="${GCS_PORT:-14443}" "$HERE/start-gcs.sh"
  run env PG_STATE_DIR="$STATE/pg" PG_PORT="${PG_PORT:-15432}" "$HERE/start-postgres.sh"
  echo "SERVERS_STATE_DIR=$STATE" >>"$tmp"
  mv "$tmp" "$ENV_FILE"
  cat "$ENV_FILE"
}

case "$CMD" in
  start) start_all ;;
  stop) stop_all ;;
  status) if all_alive; then cat "$ENV_FILE"; else echo "servers.sh: not running" >&2; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
