#!/usr/bin/env bash
# PostgreSQL test server on 127.0.0.1 (Debian's postgresql package: initdb + pg_ctl), for FILEFEED_DATABASE_URL.
# Env: PG_PORT (default 15432), PG_STATE_DIR (cluster, socket, log), PG_DB (filefeed), PG_ROLE (filefeed).
# The cluster trusts connections from 127.0.0.1 (a private test server); filefeed connects as PG_ROLE, a plain
# LOGIN role that owns its database and nothing else (no superuser, no CREATEDB), as production would.
# fsync and synchronous_commit stay on (the defaults): the tests measure real durability costs.
# Prints KEY=VALUE lines on stdout; exits non-zero (with the server log on stderr) when the server does not start.
# Stop: kill -INT "$(head -1 "$PG_STATE_DIR/data/postmaster.pid")" (fast shutdown).
set -euo pipefail
P=${PG_PORT:-15432}
STATE=${PG_STATE_DIR:-/tmp/filefeed-pg-$P}
DB=${PG_DB:-filefeed}
ROLE=${PG_ROLE:-filefeed}
if (exec 3<>"/dev/tcp/127.0.0.1/$P") 2>/dev/null; then echo "start-postgres.sh: port $P is in use" >&2; exit 2; fi
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
# initdb refuses to run as root: as root, the server runs as the 'postgres' OS user the package creates
if [ "$(id -u)" = 0 ]; then RUN=(runuser -u postgres --); OWNER=postgres; else RUN=(); OWNER=$(id -un); fi
mkdir -p "$STATE"
chown "$OWNER" "$STATE"
chmod 700 "$STATE"
if [ ! -f "$STATE/data/PG_VERSION" ]; then
  "${RUN[@]}" "$BIN/initdb" -D "$STATE/data" -U postgres --auth=trust -E UTF8 >"$STATE/initdb.log" 2>&1 \
    || { cat "$STATE/initdb.log" >&2; exit 1; }
fi
"${RUN[@]}" "$BIN/pg_ctl" -D "$STATE/data" -l "$STATE/server.log" -w -t 60 \
  -o "-p $P -k $STATE -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null \
  || { cat "$STATE/server.log" >&2; exit 1; }
psql_admin() { "${RUN[@]}" "$BIN/psql" -h 127.0.0.1 -p "$P" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'" | grep -q 1 \
  || psql_admin -c "CREATE ROLE \"$ROLE\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
psql_admin -c "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1 \
  || psql_admin -c "CREATE DATABASE \"$DB\" OWNER \"$ROLE\""
cat <<EOT
PG_PORT=$P
PG_STATE_DIR=$STATE
PG_PID=$(head -1 "$STATE/data/postmaster.pid")
PG_ADMIN_URL=postgresql://postgres@127.0.0.1:$P/postgres
DATABASE_URL=postgresql://$ROLE@127.0.0.1:$P/$DB
EOT
