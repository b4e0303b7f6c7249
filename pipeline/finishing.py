"""What a roll does to its encoded files before publishing them: PGP encryption, then the `_SUCCESS` markers.

Both run before `encoded.json` is written, so a resumed roll publishes exactly the bytes it recorded: encryption is
randomised (a fresh session key per file), and it never runs twice for a roll whose encoding finished.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.feed import SUCCESS_FILE_NAME
from pipeline.durable import fsync_dir
from pipeline.encode import EncodedFile, EncodeSpec
from pipeline.naming import check_name, roll_folders
from pipeline.pgp import EXTENSION, Encryptor


def encrypt_files(
    out: Path, files: list[EncodedFile], armoured: str, spec: EncodeSpec, heartbeat: Callable[[], None]
) -> tuple[list[EncodedFile], str]:
    """Encrypt each file of `out` to `<local>.gpg` (the plaintext is removed); return them and the new extension."""
    # Only uncompressed CSV gains from gpg's own compression; gzip, zstd and Parquet data would just cost time.
    compress = spec.file_format == "csv" and spec.compression == "none"
    encrypted: list[EncodedFile] = []
    with Encryptor(armoured, compress=compress) as encryptor:
        for f in files:
            heartbeat()
            target = out / f"{f.name}.{EXTENSION}"
            size, sha256 = encryptor.encrypt(out / f.name, target)
            (out / f.name).unlink()
            encrypted.append(EncodedFile(target.name, f.rows, size, sha256))
    fsync_dir(out)
    return encrypted, f"{spec.extension}.{EXTENSION}"


def build_markers(out: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One empty `_SUCCESS` per folder of the roll's files, published after all of them."""
    markers: list[dict[str, Any]] = []
    if not entries:
        return markers
    for index, folder in enumerate(roll_folders([e["name"] for e in entries]), 1):
        local = f"success-{index:05d}"
        # empty: nothing to fsync but its name, which fsync_dir below makes durable
        (out / local).write_bytes(b"")
        markers.append({
            "local": local,
            "name": check_name(f"{folder}/{SUCCESS_FILE_NAME}" if folder else SUCCESS_FILE_NAME),
            "bytes": 0,
            "sha256": hashlib.sha256(b"").hexdigest(),
        })
    fsync_dir(out)
    return markers
