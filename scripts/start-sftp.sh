#!/usr/bin/env bash
# SFTP test server on 127.0.0.1: Debian OpenSSH sshd, SFTP only (internal-sftp), chrooted, key-only auth. Run as root.
# Env: SFTP_PORT (default 12222), SFTP_STATE_DIR (config, keys, log, pid), SFTP_KEYS_DIR (authorized_keys, default
#      /srv/filefeed-sftp-keys/$PORT), SFTP_CHROOT (default
#      /srv/filefeed-sftp-test for the default port, /srv/filefeed-sftp-test-$PORT otherwise), SFTP_USER (filefeedsftp).
# Prints KEY=VALUE lines on stdout; exits non-zero (with the sshd log on stderr) when sshd does not start.
# Stop: kill "$(cat "$SFTP_STATE_DIR/sshd.pid")".
set -euo pipefail
PORT=${SFTP_PORT:-12222}
STATE=${SFTP_STATE_DIR:-/tmp/filefeed-sftp-$PORT}
if [ "$PORT" = 12222 ]; then CHROOT=${SFTP_CHROOT:-/srv/filefeed-sftp-test}; else CHROOT=${SFTP_CHROOT:-/srv/filefeed-sftp-test-$PORT}; fi
USER_=${SFTP_USER:-filefeedsftp}

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "start-sftp.sh: port $PORT is in use" >&2; exit 2; fi
[ -x /usr/sbin/sshd ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null; }
install -d -m 0755 /run/sshd          # privilege-separation directory sshd insists on
mkdir -p "$STATE"
# sshd reads authorized_keys as the SFTP user, so it must not live under a 0700 folder such as a mktemp or pytest
# dir (pytest even re-chmods /tmp/pytest-of-root to 0700 whenever any session starts): keep it in a root-owned,
# world-traversable folder of its own.
KEYS_DIR=${SFTP_KEYS_DIR:-/srv/filefeed-sftp-keys/$PORT}
install -d -o root -g root -m 0755 "$(dirname "$KEYS_DIR")" "$KEYS_DIR"
if ! id "$USER_" >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /upload --shell /usr/sbin/nologin "$USER_"
fi
usermod -p '*' "$USER_"               # a locked ('!') account is refused by sshd with UsePAM no
[ -f "$STATE/host_ed25519" ]   || ssh-keygen -q -t ed25519 -N '' -f "$STATE/host_ed25519"
[ -f "$STATE/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/client_ed25519"
install -m 0644 "$STATE/client_ed25519.pub" "$KEYS_DIR/authorized_keys"
# every component of a ChrootDirectory must be root-owned and not group/world-writable (hence /srv, not /tmp)
install -d -o root -g root -m 0755 "$(dirname "$CHROOT")" "$CHROOT"
install -d -o "$USER_" -g "$USER_" -m 0755 "$CHROOT/upload"

cat >"$STATE/sshd_config" <<CFG
Port $PORT
ListenAddress 127.0.0.1
HostKey $STATE/host_ed25519
PidFile $STATE/sshd.pid
AuthorizedKeysFile $KEYS_DIR/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers $USER_
AllowTcpForwarding no
X11Forwarding no
MaxStartups 100
MaxSessions 50
Subsystem sftp internal-sftp
ChrootDirectory $CHROOT
ForceCommand internal-sftp -d /upload
LogLevel VERBOSE
CFG
/usr/sbin/sshd -t -f "$STATE/sshd_config"
/usr/sbin/sshd -D -e -f "$STATE/sshd_config" >"$STATE/sshd.log" 2>&1 &   # -D foreground (we background it), -e log to stderr
PID=$!
echo "$PID" >"$STATE/pid"

fail() { echo "start-sftp.sh: $1; sshd log follows" >&2; cat "$STATE/sshd.log" >&2; kill "$PID" 2>/dev/null || true; exit 1; }
rm -f "$STATE/known_hosts"
for _ in $(seq 1 200); do   # up to 20 s: ready once it answers the key exchange with its host key
  kill -0 "$PID" 2>/dev/null || fail "sshd exited"
  if ssh-keyscan -T 2 -p "$PORT" -t ed25519 127.0.0.1 >"$STATE/known_hosts.tmp" 2>/dev/null && [ -s "$STATE/known_hosts.tmp" ]; then
    mv "$STATE/known_hosts.tmp" "$STATE/known_hosts"; break
  fi
  sleep 0.1
done
[ -s "$STATE/known_hosts" ] || fail "no host key answered on 127.0.0.1:$PORT"
cat <<OUT
SFTP_HOST=127.0.0.1
SFTP_PORT=$PORT
SFTP_USER=$USER_
SFTP_KEY=$STATE/client_ed25519
SFTP_KNOWN_HOSTS=$STATE/known_hosts
SFTP_ROOT=/upload
SFTP_LOCAL_ROOT=$CHROOT/upload
SFTP_STATE_DIR=$STATE
SFTP_LOG=$STATE/sshd.log
SFTP_PID=$PID
OUT
