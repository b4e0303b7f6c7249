"""Partner profiles: presets of feed properties that make files a partner's onboarding spec accepts.

A preset only fills properties the feed does not set itself: an explicit property always wins. Each preset cites
its source in README.md ("Partner profiles"); the values here are the ones those specs state.
"""

from __future__ import annotations

from typing import Any

PARTNER_PROFILES: dict[str, dict[str, Any]] = {
    # LiveRamp (Audience onboarding file format): header row identical across files, SHA-256 hex of the trimmed
    # lowercased email, ASCII names of at most 250 characters with `file-part-N`, at most 500 MB uncompressed per
    # file. PGP is recommended for PII: set `encryption = pgp` with LiveRamp's key.
    "liveramp": {
        "identifier_types": "USER_EMAIL",
        "columns": "identifier=SHA256_EMAIL,segment_id=SEGMENT_ID",
        "email_hashing": "sha256_hex",
        "email_normalization": "trim_lower",
        "file_format": "csv",
        "compression": "gzip",
        "csv_header": True,
        "file_name_template": "{segment_id}/{feed_id}_{segment_id}_{date}T{time}Z_{batch_id}_file-part-{part}.{ext}",
        "max_file_bytes": 500_000_000,
    },
    # Google Customer Match (customer list CSV): headers `Email,Phone,First Name,Last Name,Country,Zip`,
    # SHA-256 hex of the trimmed lowercased address; the other columns stay empty.
    "google_customer_match": {
        "identifier_types": "USER_EMAIL",
        "columns": "identifier=Email,blank=Phone,blank=First Name,blank=Last Name,blank=Country,blank=Zip",
        "email_hashing": "sha256_hex",
        "email_normalization": "trim_lower",
        "file_format": "csv",
        "compression": "none",
        "csv_header": True,
    },
    # Meta Custom Audiences (customer file): one `email` column of SHA-256 hex of the normalised address.
    "meta": {
        "identifier_types": "USER_EMAIL",
        "columns": "identifier=email",
        "email_hashing": "sha256_hex",
        "email_normalization": "trim_lower",
        "file_format": "csv",
        "compression": "none",
        "csv_header": True,
    },
    # The Trade Desk through UID2/EUID: UID2 normalisation (gmail.com dots and +suffix removed), SHA-256, Base64 of
    # the 32-byte digest (44 characters), in an `email_hash` column.
    "ttd_uid2": {
        "identifier_types": "USER_EMAIL",
        "columns": "identifier=email_hash",
        "email_hashing": "sha256_base64",
        "email_normalization": "uid2",
        "file_format": "csv",
        "compression": "gzip",
        "csv_header": True,
    },
}


def apply_profile(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with the named profile's presets filled in where the feed sets nothing; unknown names are left to the
    model's validation (which lists the known ones)."""
    name = raw.get("partner_profile")
    preset = PARTNER_PROFILES.get(name.strip().lower()) if isinstance(name, str) else None
    if preset is None:
        return raw
    merged = dict(preset)
    merged.update({k: v for k, v in raw.items() if v is not None})
    # The preset's compression belongs to its format: a feed that picks another format gets that format's default.
    if "file_format" in raw and "compression" not in raw:
        merged.pop("compression", None)
    return merged
