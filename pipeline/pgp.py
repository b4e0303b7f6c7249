"""OpenPGP for partner files: check the recipients' public keys at feed creation, encrypt finished files at roll time.

Both go through Debian's `gpg` (the tool partners decrypt with). Keys are inspected by python-gnupg's colon-listing
parser in a throw-away home folder; files are encrypted by one `gpg --encrypt` process per file that streams from
the encoded file to a temp file (memory bounded whatever the size), under a deadline scaled to the file size,
then hashed, fsynced and renamed. Nothing is kept in a keyring between calls: the plan of a roll holds the armoured
keys it encrypts to, so a resumed roll encrypts to the same recipients.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

GPG = "gpg"
# A deadline for one gpg call: this much, plus the file's size at a pessimistic 5 MB/s (gpg streams at 150+ MB/s).
GPG_BASE_SECONDS = 30.0
GPG_SECONDS_PER_BYTE = 1 / 5_000_000
MAX_KEY_TEXT = 256 * 1024
CACHE_SECONDS = 3600
EXTENSION = "gpg"
_HASH_CHUNK = 1 << 20


class PgpError(Exception):
    """gpg refused or failed; the message names the fingerprints or the file, never key material.

    Transient only for a deadline: a refused key or a gpg error does not heal by running the roll again.
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class KeyReport:
    """What creation needs to know about the armoured keys: usable recipients and the problem of each other key."""

    fingerprints: tuple[str, ...]
    problems: tuple[str, ...]


@contextmanager
def _home() -> Iterator[str]:
    home = tempfile.mkdtemp(prefix="filefeed-gpg-")
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _base_args(home: str) -> list[str]:
    # --no-autostart: public-key work needs no agent, and none may be left running per temp home.
    return [GPG, "--homedir", home, "--batch", "--no-tty", "--no-autostart", "--no-options", "--quiet"]


def inspect_keys(armoured: str) -> KeyReport:
    """Usable encryption recipients among `armoured` keys, and why each other key is refused (by fingerprint).

    A key is usable when it is neither expired nor revoked and has a valid encryption subkey (gpg's key-level
    capabilities carry `E` only then: an expired or revoked encryption subkey does not count). Answers are cached
    for at most an hour: a key can expire while a feed's context is cached.
    """
    return _inspect_keys(armoured, int(time.time() // CACHE_SECONDS))


@lru_cache(maxsize=64)
def _inspect_keys(armoured: str, _period: int) -> KeyReport:
    import gnupg  # python-gnupg: imported here so that feeds without encryption never need gpg

    if len(armoured) > MAX_KEY_TEXT:
        return KeyReport((), (f"is longer than {MAX_KEY_TEXT // 1024} KiB",))
    if "-----BEGIN PGP PUBLIC KEY BLOCK-----" not in armoured:
        return KeyReport((), ("must be an ASCII-armoured public key block (-----BEGIN PGP PUBLIC KEY BLOCK-----)",))
    if "PRIVATE KEY BLOCK" in armoured:
        return KeyReport((), ("holds a private key: give the partner's public key only",))
    with _home() as home:
        try:
            keys = gnupg.GPG(gpgbinary=GPG, gnupghome=home, options=["--no-autostart"]).scan_keys_mem(armoured)
        except (OSError, ValueError) as e:
            return KeyReport((), (f"could not be read by gpg ({type(e).__name__}); is gnupg installed?",))
    usable: list[str] = []
    problems: list[str] = []
    for key in keys:
        fpr = str(key.get("fingerprint", ""))
        validity = key.get("trust", "")
        if validity == "r":
            problems.append(f"key {fpr} is revoked")
        elif validity == "e":
            problems.append(f"key {fpr} is expired")
        elif "E" not in str(key.get("cap", "")):
            problems.append(f"key {fpr} has no valid encryption subkey (sign-only, or its subkeys expired or revoked)")
        else:
            usable.append(fpr)
    if not keys:
        problems.append("holds no public key gpg can read")
    return KeyReport(tuple(usable), tuple(problems))


def _run(args: list[str], *, timeout: float, what: str) -> None:
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PgpError(f"gpg did not finish {what} within {timeout:.0f} s", transient=True) from None
    except OSError as e:
        raise PgpError(f"gpg could not run for {what}: {e.strerror}; install gnupg (scripts/install.sh)") from None
    if proc.returncode != 0:
        # gpg's stderr names key ids and files only; keep its last line, short
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise PgpError(f"gpg failed {what}: {detail[0][:200]}")


class Encryptor:
    """Encrypts the files of one roll to the recipients of `armoured` (imported once into a private home)."""

    def __init__(self, armoured: str, *, compress: bool):
        report = inspect_keys(armoured)
        if report.problems or not report.fingerprints:
            raise PgpError("pgp_public_key cannot be used now: " + "; ".join(report.problems or ("no usable key",)))
        self.fingerprints = report.fingerprints
        # The encoded file is already gzip/zstd/Parquet-compressed in most feeds: deflating it again in gpg would
        # cost most of the time for no gain (gpg's default zlib runs at about 28 MB/s here).
        self._compress = compress
        self._home = tempfile.mkdtemp(prefix="filefeed-gpg-")
        try:
            keyfile = Path(self._home) / "recipients.asc"
            keyfile.write_text(armoured)
            _run([*_base_args(self._home), "--import", str(keyfile)], timeout=GPG_BASE_SECONDS, what="importing keys")
        except BaseException:
            self.close()
            raise

    def encrypt(self, src: Path, dst: Path) -> tuple[int, str]:
        """Encrypt `src` into `dst` (temp + fsync + rename); return its size and sha256."""
        temp = dst.with_name(f".{dst.name}.tmp")
        temp.unlink(missing_ok=True)
        args = [*_base_args(self._home), "--trust-model", "always", "--compress-algo", "zlib" if self._compress else
                "none", "--output", str(temp)]
        for fpr in self.fingerprints:
            args += ["--recipient", fpr]
        timeout = GPG_BASE_SECONDS + src.stat().st_size * GPG_SECONDS_PER_BYTE
        try:
            _run([*args, "--encrypt", str(src)], timeout=timeout, what=f"encrypting {src.name}")
            sha = hashlib.sha256()
            size = 0
            with open(temp, "rb+") as f:
                while chunk := f.read(_HASH_CHUNK):
                    sha.update(chunk)
                    size += len(chunk)
                os.fsync(f.fileno())
            os.replace(temp, dst)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return size, sha.hexdigest()

    def close(self) -> None:
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> Encryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
