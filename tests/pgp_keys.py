"""OpenPGP keys made in the test with `gpg --batch`: a usable partner key (its secret kept to decrypt), a second
recipient, and keys creation must refuse: expired, revoked, sign-only."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class PgpKeys:
    home: Path  # holds the secret keys: decrypt with gpg(home, "--decrypt", ...)
    good: str
    second: str
    expired: str
    revoked: str
    sign_only: str
    fingerprints: dict[str, str]

    def gpg(self, *args: str, input: bytes | None = None) -> bytes:
        return gpg(self.home, *args, input=input)

    def decrypt(self, data: bytes) -> bytes:
        return self.gpg("--decrypt", input=data)


def gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", "--quiet", *args], input=input,
                          capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"gpg {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _fingerprint(home: Path, uid: str) -> str:
    out = gpg(home, "--with-colons", "--list-keys", uid).decode()
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def make_keys(home: Path) -> PgpKeys:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    nopass = ("--passphrase", "", "--pinentry-mode", "loopback")
    gpg(home, *nopass, "--quick-gen-key", "Partner <partner@example.com>", "future-default", "default", "0")
    gpg(home, *nopass, "--quick-gen-key", "Second <second@example.com>", "future-default", "default", "0")
    # created in 2020 with one year of validity: expired whatever today's date
    gpg(home, *nopass, "--faked-system-time", "20200101T000000", "--quick-gen-key", "Expired <expired@example.com>",
        "future-default", "default", "1y")
    gpg(home, *nopass, "--quick-gen-key", "Signer <signer@example.com>", "ed25519", "sign", "0")
    gpg(home, *nopass, "--quick-gen-key", "Revoked <revoked@example.com>", "future-default", "default", "0")
    fprs = {name: _fingerprint(home, f"{name}@example.com")
            for name in ("partner", "second", "expired", "signer", "revoked")}
    # gpg writes a revocation certificate for every new key, its armour guarded by a leading ':'
    rev = (home / "openpgp-revocs.d" / f"{fprs['revoked']}.rev").read_text().replace(":-----BEGIN", "-----BEGIN")
    gpg(home, "--import", input=rev.encode())

    def export(name: str) -> str:
        return gpg(home, "--armor", "--export", f"{name}@example.com").decode()

    return PgpKeys(home, export("partner"), export("second"), export("expired"), export("revoked"),
                    export("signer"), fprs)


@pytest.fixture(scope="session")
def pgp_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgpKeys]:
    home = tmp_path_factory.mktemp("gnupg")
    try:
        yield make_keys(home)
    finally:
        # key generation started an agent for this home: stop it (by its home, nobody else's)
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30,
                       check=False)
