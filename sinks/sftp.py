"""`sftp://user@host:port/absolute/path`: publish over SFTP with paramiko.

Host key verification is mandatory. The server's key must match `sftp_host_key` (one or more OpenSSH public key
lines such as `ssh-ed25519 AAAA...`, known_hosts lines, or `SHA256:...` fingerprints) or an entry of the known_hosts
file named by the service setting FILEFEED_SFTP_KNOWN_HOSTS (environment or FILEFEED_CONFIG). With neither, or on a mismatch, the sink refuses to
connect (TerminalError, kind "host_key"); it never accepts an unknown key, and it checks the key before sending any
credential.

Publish: write a dot-prefixed temp file in the destination folder (1 MiB reads from the local file, sent as pipelined
32 KiB SFTP writes: without pipelining every write waits for its ack and throughput collapses), check the remote size, then rename onto the final name
with `posix-rename@openssh.com` (atomic, same folder so it never crosses filesystems). The final name is stat'ed
before uploading: same size and bytes -> `already_present`; otherwise TerminalError(kind="conflict"), so a re-publish
never replaces different content. posix-rename itself would replace a file created between that stat and the rename
by a concurrent publisher of the same name; deterministic names make that the same bytes.

Servers without the posix-rename extension (detected at run time from SSH_FX_OP_UNSUPPORTED): plain SFTP `rename`,
which by the SFTP v3 spec never overwrites. If it fails because the final name exists, the existing file is compared
as above. Some servers (MinIO's SFTP) have no rename at all: publish then fails with a TerminalError.

Errors: connection refused/reset/timeouts, dropped sessions and the generic SSH_FX_FAILURE (which is also what
OpenSSH answers for a full disk: SFTP v3 has no "no space" status) are transient; authentication, host key,
permission and missing-path errors are terminal. A full disk is thus retried within the caller's bounded budget and
then lands in failed/, which is what an operator who frees space wants.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import io
import posixpath
import socket
import stat as stat_mod
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import paramiko

from sinks import register
from sinks.base import (
    Leftover,
    RemoteObject,
    Sink,
    SinkError,
    TerminalError,
    TransientError,
    check_name,
    classify_os_error,
    same_bytes,
    temp_leftover,
    temp_name,
)

MiB = 1 << 20
KNOWN_HOSTS_ENV = "FILEFEED_SFTP_KNOWN_HOSTS"

# OpenSSH key type names -> the host key algorithms paramiko negotiates for them
_KEY_ALGOS = {
    "ssh-ed25519": ["ssh-ed25519"],
    "ecdsa-sha2-nistp256": ["ecdsa-sha2-nistp256"],
    "ecdsa-sha2-nistp384": ["ecdsa-sha2-nistp384"],
    "ecdsa-sha2-nistp521": ["ecdsa-sha2-nistp521"],
    "ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
}


def known_hosts_file() -> Path | None:
    """The FILEFEED_SFTP_KNOWN_HOSTS setting of this process (a sink is opened from feed properties alone)."""
    from config.settings import active_settings

    settings = active_settings()
    return settings.sftp_known_hosts if settings is not None else None


def fingerprint(key_blob: bytes) -> str:
    """OpenSSH SHA256 fingerprint of a public key blob (`ssh-keygen -lf` format)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


def parse_host_key_pins(text: str) -> tuple[dict[str, set[bytes]], set[str]]:
    """Split `sftp_host_key` into {key type: {blobs}} and {SHA256 fingerprints}. Raises TerminalError if unusable."""
    keys: dict[str, set[bytes]] = {}
    prints: set[str] = set()
    for raw in text.replace(",", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("SHA256:"):
            prints.add("SHA256:" + line.split()[0][7:].rstrip("="))
            continue
        tokens = line.split()
        # an OpenSSH public key line, or a known_hosts line whose first token is the host pattern
        for i, tok in enumerate(tokens[:-1]):
            if tok in _KEY_ALGOS or tok.startswith(("ecdsa-sha2-", "ssh-", "sk-")):
                try:
                    blob = base64.b64decode(tokens[i + 1], validate=True)
                except (binascii.Error, ValueError):
                    break
                keys.setdefault(tok, set()).add(blob)
                break
        else:
            raise TerminalError("sftp_host_key: each line must be an OpenSSH public key ('ssh-ed25519 AAAA...') "
                                "or a SHA256:... fingerprint", kind="config")
    if not keys and not prints:
        raise TerminalError("sftp_host_key is empty", kind="config")
    return keys, prints


def load_private_key(text: str) -> paramiko.PKey:
    """The private key from its TEXT (OpenSSH or PEM), trying each type paramiko knows."""
    last: Exception | None = None
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError, TypeError, IndexError) as e:  # wrong type: try the next
            last = e
    # the message names the problem, never the key
    raise TerminalError(
        "sftp_private_key is not a readable unencrypted ed25519, ecdsa or rsa private key "
        f"({type(last).__name__ if last else 'empty'})",
        kind="auth",
    )


def classify(e: BaseException, what: str) -> SinkError:
    """One place that turns paramiko/socket/SFTP errors into TransientError / TerminalError."""
    if isinstance(e, SinkError):
        return e
    if isinstance(e, paramiko.BadHostKeyException):
        return TerminalError(f"{what}: host key mismatch", kind="host_key")
    if isinstance(e, (paramiko.AuthenticationException, paramiko.BadAuthenticationType)):
        return TerminalError(f"{what}: authentication refused: check sftp_private_key / sftp_password", kind="auth")
    if isinstance(e, paramiko.ssh_exception.IncompatiblePeer):
        return TerminalError(f"{what}: no SSH algorithm in common with the server", kind="config")
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        return TransientError(f"{what}: connection refused", kind="network")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return TransientError(f"{what}: timed out", kind="timeout")
    if isinstance(e, (EOFError, paramiko.ChannelException, paramiko.SSHException)):
        return TransientError(f"{what}: SSH session failed ({type(e).__name__})", kind="network")
    if isinstance(e, OSError):
        if e.errno is None:  # an SFTP status without errno mapping: paramiko puts the server's text in args[0]
            text = str(e.args[0]) if e.args else ""
            if text.lower() in ("socket is closed", "server connection dropped", "connection reset by peer"):
                return TransientError(f"{what}: connection lost", kind="network")  # paramiko's own, not a status
            if "unsupported" in text.lower():
                return TerminalError(f"{what}: the server does not support this operation", kind="unsupported")
            if "no space" in text.lower() or "quota" in text.lower():
                return TransientError(f"{what}: no space left on the server", kind="no_space")
            # SSH_FX_FAILURE: generic server-side failure (full disk included), retried within the budget
            return TransientError(f"{what}: server-side failure ({text or 'Failure'})", kind="remote_io")
        return classify_os_error(e, what)
    return TerminalError(f"{what}: unexpected {type(e).__name__}", kind="client")


def _read_source(src: Any, n: int, local_path: Path) -> bytes:
    """Read the local file, so its errors are told apart from the server's."""
    try:
        return src.read(n)
    except OSError as e:
        raise classify_os_error(e, f"reading {local_path}") from None


@register
class SFTPSink(Sink):
    scheme = "sftp"

    # Tunables, overridable per instance before first use.
    write_buffer: int = MiB
    posix_rename_supported: bool | None = None  # None: not known yet; found on first publish

    _transport: Any = None
    _sftp: Any = None

    def __init__(self, props: Any):
        super().__init__(props)
        self.timeout = self.read_timeout  # every SFTP request on the channel
        self._dirs: set[str] = set()  # folders known to exist in this session (saves round trips)

    # -- connection --------------------------------------------------------------------------------------------
    def _host_key_pins(self) -> tuple[dict[str, set[bytes]], set[str]]:
        d = self.destination
        if self.props.sftp_host_key and self.props.sftp_host_key.strip():
            return parse_host_key_pins(self.props.sftp_host_key)
        path = known_hosts_file()
        if path:
            try:
                hk = paramiko.HostKeys(path)
            except OSError as e:
                raise TerminalError(f"{KNOWN_HOSTS_ENV}={path}: cannot read ({e.strerror})", kind="config") from None
            entry = hk.lookup(d.host if d.port == 22 else f"[{d.host}]:{d.port}") or {}
            keys = {t: {k.asbytes()} for t, k in entry.items()}
            if keys:
                return keys, set()
            raise TerminalError(f"{d.host}:{d.port} has no entry in {path}", kind="host_key")
        raise TerminalError(
            "sftp host key unknown: set sftp_host_key (e.g. the output of `ssh-keyscan -t ed25519 HOST`) "
            f"or {KNOWN_HOSTS_ENV}; unknown host keys are never accepted",
            kind="host_key",
        )

    def _connect(self) -> Any:
        if self._sftp is not None and self._transport is not None and self._transport.is_active():
            return self._sftp
        self.close()
        d = self.destination
        where = f"sftp://{d.user}@{d.host}:{d.port}"
        keys, prints = self._host_key_pins()  # before any network: a config error is terminal, not a retry
        pkey = load_private_key(self.props.sftp_private_key.get_secret_value()) if self.props.sftp_private_key else None
        transport = None
        try:
            sock = socket.create_connection((d.host, d.port), timeout=self.connect_timeout)
            transport = paramiko.Transport(sock)
            transport.banner_timeout = self.connect_timeout
            transport.auth_timeout = self.connect_timeout
            transport.handshake_timeout = self.connect_timeout
            if keys and not prints:
                # ask for the key type(s) we pinned, or a server with several host keys could offer another one
                wanted = [a for t in keys for a in _KEY_ALGOS.get(t, [t])]
                usable = [a for a in wanted if a in transport.get_security_options().key_types]
                if usable:
                    transport.get_security_options().key_types = usable
            transport.start_client(timeout=self.connect_timeout)
            server_key = transport.get_remote_server_key()
            blob = server_key.asbytes()
            if blob not in keys.get(server_key.get_name(), set()) and fingerprint(blob) not in prints:
                raise TerminalError(
                    f"{where}: host key mismatch: the server offered {server_key.get_name()} {fingerprint(blob)}, "
                    "which is not the pinned key (sftp_host_key / known_hosts)",
                    kind="host_key",
                )
            authenticated = False
            if pkey is not None:
                try:
                    transport.auth_publickey(d.user, pkey)
                    authenticated = True
                except paramiko.AuthenticationException:
                    if self.props.sftp_password is None:
                        raise
            if not authenticated and self.props.sftp_password is not None:
                transport.auth_password(d.user, self.props.sftp_password.get_secret_value())
            transport.set_keepalive(30)
            sftp = paramiko.SFTPClient.from_transport(transport)
            if sftp is None:
                raise TransientError(f"{where}: could not open the SFTP channel", kind="network")
            sftp.get_channel().settimeout(self.timeout)
        except BaseException as e:
            if transport is not None:
                transport.close()
            if isinstance(e, Exception):
                raise classify(e, f"connecting to {where}") from None
            raise
        self._transport, self._sftp = transport, sftp
        return sftp

    def close(self) -> None:
        for obj in (self._sftp, self._transport):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self._sftp = self._transport = None
        self._dirs.clear()

    def _fail(self, e: BaseException, what: str) -> SinkError:
        """Classify; a transient error leaves the session in doubt, so drop it (the next call reconnects)."""
        err = e if isinstance(e, SinkError) else classify(e, what)
        if err.kind == "remote_io" and not (self._transport is not None and self._transport.is_active()):
            err = TransientError(f"{what}: connection lost", kind="network")  # a failure status from a dying session
        if err.transient:
            self.close()
        return err

    # -- paths -------------------------------------------------------------------------------------------------
    def _remote(self, name: str) -> str:
        check_name(name)
        return posixpath.join(self.destination.path, name)

    def _makedirs(self, sftp: Any, folder: str) -> None:
        """mkdir -p, tolerant of a concurrent creator."""
        if folder in self._dirs or folder in ("", "/"):
            return
        try:
            if stat_mod.S_ISDIR(sftp.stat(folder).st_mode or 0):
                self._dirs.add(folder)
                return
            raise TerminalError(f"{folder} exists and is not a folder", kind="conflict")
        except FileNotFoundError:
            pass
        self._makedirs(sftp, posixpath.dirname(folder))
        try:
            sftp.mkdir(folder)
        except OSError:
            if not stat_mod.S_ISDIR(sftp.stat(folder).st_mode or 0):  # lost a race to another creator is fine
                raise
        self._dirs.add(folder)

    # -- publish: the hooks of Sink.publish ----------------------------------------------------------------------
    def _lookup(self, name: str) -> Any:
        return self._stat(self._connect(), self._remote(name))

    def _size_of(self, found: Any) -> int:
        return found.st_size if stat_mod.S_ISREG(found.st_mode or 0) else -1

    def _same_content(self, local_path: Path, name: str, found: Any) -> bool:
        with self._connect().open(self._remote(name), "rb", bufsize=MiB) as f:
            f.prefetch(found.st_size)
            return same_bytes(local_path, iter(lambda: f.read(MiB), b""))

    def _classify(self, e: BaseException, what: str) -> SinkError:
        return self._fail(e, what)

    def _create(self, local_path: Path, name: str, size: int) -> bool:
        """Upload to a dot-prefixed temp name in the final folder, check its size, rename it onto the final name.

        posix-rename would replace a file created between the lookup and the rename by a concurrent publisher of
        the same name; deterministic names make that the same bytes. A refused plain rename: False.
        """
        sftp = self._connect()
        final = self._remote(name)
        folder = posixpath.dirname(final)
        tmp = posixpath.join(folder, temp_name(posixpath.basename(final)))
        tmp_created = False
        dst: Any = None
        try:
            self._makedirs(sftp, folder)
            with self.open_source(local_path) as src:
                # unbuffered handle fed one SFTP request (32 KiB) per write: paramiko's own buffering re-slices its
                # whole buffer after every request (quadratic copying), costing about a quarter of the throughput
                dst = sftp.open(tmp, "wxb", bufsize=0)
                tmp_created = True
                piece = dst.MAX_REQUEST_SIZE
                with dst:
                    dst.set_pipelined(True)
                    while chunk := _read_source(src, self.write_buffer, local_path):
                        view = memoryview(chunk)
                        for off in range(0, len(chunk), piece):
                            dst.write(bytes(view[off:off + piece]))
                # leaving the block closed the file, which waits for every pipelined write's status
            remote_size = sftp.stat(tmp).st_size
            if remote_size != size:
                raise TransientError(f"{self.url(name)}: the server holds {remote_size} of {size} bytes after upload",
                                     kind="io")
            if self._rename(sftp, tmp, final):
                tmp_created = False
                return True
            return False  # plain rename refused: the final name appeared meanwhile (or no rename at all)
        except BaseException as e:
            if dst is not None and not dst.closed:
                # its close() already failed; without this paramiko's __del__ retries it on a dead channel
                dst._closed = True
            if tmp_created:
                self._remove_quietly(sftp, tmp)
                tmp_created = False
            if not isinstance(e, Exception):
                self.close()
            raise
        finally:
            if tmp_created:
                self._remove_quietly(sftp, tmp)

    def _remove_quietly(self, sftp: Any, path: str) -> None:
        """Best effort: a dot-prefixed leftover is never mistaken for a published file."""
        try:
            sftp.remove(path)
        except Exception:
            pass

    def _rename(self, sftp: Any, tmp: str, final: str) -> bool:
        """Move tmp onto final; False when a plain rename was refused (final exists, or no rename at all)."""
        if self.posix_rename_supported is not False:
            try:
                sftp.posix_rename(tmp, final)
                self.posix_rename_supported = True
                return True
            except OSError as e:
                if e.errno is not None or "unsupported" not in str(e.args[0] if e.args else "").lower():
                    raise
                self.posix_rename_supported = False  # SSH_FX_OP_UNSUPPORTED: fall back for this session on
        try:
            sftp.rename(tmp, final)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.ENOENT):
                raise
            return False

    def _stat(self, sftp: Any, path: str) -> Any:
        try:
            return sftp.stat(path)
        except FileNotFoundError:
            return None

    # -- the rest of the contract ------------------------------------------------------------------------------
    def check(self) -> None:
        root = self.destination.path
        probe = posixpath.join(root, f".filefeed-probe-{uuid.uuid4().hex}")
        try:
            sftp = self._connect()
            self._makedirs(sftp, root)
            try:
                with sftp.open(probe, "wxb") as f:
                    f.write(b"filefeed probe\n")
            finally:
                self._remove_quietly(sftp, probe)
        except SinkError as e:
            if e.transient:
                self.close()
            raise
        except Exception as e:
            raise self._fail(e, f"checking {self.destination.uri}") from None

    def stat(self, name: str) -> RemoteObject | None:
        path = self._remote(name)
        try:
            attrs = self._stat(self._connect(), path)
        except SinkError:
            raise
        except Exception as e:
            raise self._fail(e, f"stat {self.url(name)}") from None
        if attrs is None or not stat_mod.S_ISREG(attrs.st_mode or 0):
            return None
        return RemoteObject(name, attrs.st_size)

    def list(self, prefix: str = "") -> Iterator[RemoteObject]:
        folder, _, _ = prefix.rpartition("/")
        if folder:
            check_name(folder)
        try:
            found = [RemoteObject(rel, a.st_size) for rel, a in self._walk(folder, prefix) if rel.startswith(prefix)]
        except SinkError:
            raise
        except Exception as e:
            raise self._fail(e, f"listing {self.destination.uri}") from None
        yield from sorted(found, key=lambda o: o.name)

    def open_read(self, name: str) -> Any:
        """A seekable file object reading `name` (prefetched), on this sink's host-key-checked connection."""
        path = self._remote(name)
        try:
            f = self._connect().open(path, "rb")
            f.prefetch()
            return f
        except SinkError:
            raise
        except Exception as e:
            raise self._fail(e, f"reading {self.url(name)}") from None

    def _walk(self, folder: str, prefix: str) -> Iterator[tuple[str, Any]]:
        """(relative name, attributes) of the regular files under `folder`, descending only where `prefix` may
        match."""
        root = self.destination.path
        sftp = self._connect()
        stack = [posixpath.join(root, folder) if folder else root]
        while stack:
            current = stack.pop()
            try:
                entries = sftp.listdir_attr(current)
            except FileNotFoundError:
                continue
            for a in entries:
                full = posixpath.join(current, a.filename)
                rel = posixpath.relpath(full, root)
                if stat_mod.S_ISDIR(a.st_mode or 0):
                    if rel.startswith(prefix) or prefix.startswith(rel + "/"):
                        stack.append(full)
                elif stat_mod.S_ISREG(a.st_mode or 0):
                    yield rel, a

    def leftovers(self, prefixes: Iterable[str], older_than: float,
                  own: Callable[[str], bool]) -> Iterator[Leftover]:
        """Our dot-prefixed temp files (a process killed mid-upload leaves one) in the folders under `prefixes`."""
        now = time.time()
        found: list[Leftover] = []
        try:
            for prefix in prefixes:
                folder = prefix.rpartition("/")[0]
                if folder:
                    check_name(folder)
                for rel, a in self._walk(folder, folder + "/" if folder else ""):
                    if lo := temp_leftover(rel, a.st_mtime or now, now, older_than, own):
                        found.append(lo)
        except SinkError:
            raise
        except Exception as e:
            raise self._fail(e, f"listing {self.destination.uri}") from None
        yield from found

    def remove_leftover(self, leftover: Leftover) -> None:
        self.remove(leftover.name)

    def read(self, name: str) -> bytes:
        path = self._remote(name)
        try:
            with self._connect().open(path, "rb") as f:
                f.prefetch()
                return f.read()
        except SinkError:
            raise
        except Exception as e:
            raise self._fail(e, f"reading {self.url(name)}") from None

    def remove(self, name: str) -> None:
        path = self._remote(name)
        try:
            self._connect().remove(path)
        except FileNotFoundError:
            return
        except SinkError:
            raise
        except Exception as e:
            raise self._fail(e, f"removing {self.url(name)}") from None
