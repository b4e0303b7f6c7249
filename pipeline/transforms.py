"""Email identifier transforms a partner's matching needs: normalise the clear address, then hash and encode it.

`email_hashing = platform` keeps today's rule (the platform's `hash` as is, else SHA-256 of the trimmed lowercased
address). Any other hashing needs the identifier's clear `email`: a hash cannot be re-hashed into another algorithm
or normalisation, so an identifier without the address is rejected with a reason, never guessed.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

EMAIL_HASHINGS = ("platform", "sha256_hex", "sha256_base64", "md5_hex", "sha1_hex")
EMAIL_NORMALIZATIONS = ("trim_lower", "uid2")
# reject reasons, in the identifier stats' `reason` tag
MISSING_EMAIL = "clear_email_required"
MALFORMED_EMAIL = "missing_or_malformed_email"

_UID2_GMAIL = "gmail.com"


def trim_lower(email: str) -> str:
    return email.strip().lower()


def uid2_normalize(email: str) -> str:
    """UID2 / EUID email normalisation: trim, lowercase; in gmail.com addresses only, drop every '.' of the local
    part and a '+' with everything after it (IAB Tech Lab UID2 docs, "Normalization and Encoding")."""
    address = email.strip().lower()
    local, at, domain = address.rpartition("@")
    if at and domain == _UID2_GMAIL:
        local = local.partition("+")[0].replace(".", "")
        return f"{local}@{domain}"
    return address


_NORMALIZERS: dict[str, Callable[[str], str]] = {"trim_lower": trim_lower, "uid2": uid2_normalize}
_HASHERS: dict[str, Callable[[bytes], str]] = {
    "sha256_hex": lambda b: hashlib.sha256(b).hexdigest(),
    "sha256_base64": lambda b: base64.b64encode(hashlib.sha256(b).digest()).decode("ascii"),
    "md5_hex": lambda b: hashlib.md5(b, usedforsecurity=False).hexdigest(),
    "sha1_hex": lambda b: hashlib.sha1(b, usedforsecurity=False).hexdigest(),
}


class EmailTransform:
    """Clear email -> the partner's identifier value. Built once per feed context."""

    def __init__(self, hashing: str, normalization: str = "trim_lower"):
        if hashing not in _HASHERS:
            raise ValueError(f"email_hashing {hashing!r} needs no transform or is unknown")
        self._hash = _HASHERS[hashing]
        self._normalize = _NORMALIZERS[normalization]

    def __call__(self, ident: dict) -> tuple[str | None, str | None]:
        """(value, None) for a usable identifier, (None, reason) otherwise."""
        email = ident.get("email")
        if email in (None, ""):
            return None, MISSING_EMAIL
        if not isinstance(email, str):
            return None, MALFORMED_EMAIL
        normalized = self._normalize(email)
        local, at, domain = normalized.rpartition("@")
        if not at or not local or not domain or any(ch.isspace() or ord(ch) < 0x20 for ch in normalized):
            return None, MALFORMED_EMAIL
        return self._hash(normalized.encode("utf-8")), None


def email_transform(hashing: str, normalization: str) -> EmailTransform | None:
    """The transform a feed's properties ask for; None keeps the platform's hash."""
    return None if hashing == "platform" else EmailTransform(hashing, normalization)
