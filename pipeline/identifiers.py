"""user_segment_update request -> staged rows. The hot path: plain dict lookups, no model per identifier."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from config.feed import IdentifierSelector
from pipeline.layout import Row
from pipeline.transforms import EmailTransform

_HEX_HASH = re.compile(r"(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64}|[0-9a-fA-F]{128})")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_VALUE_LENGTH = 1024
# A row's `ts` is epoch milliseconds from 1970-01-01 to 9999-12-31T23:59:59.999Z: it fits int64 (the journal, Arrow,
# Parquet, DuckDB), JSON numbers (< 2**53) and every date library. Anything else is rejected before it is staged.
MIN_TS_MS = 0
MAX_TS_MS = 253_402_300_799_999



class RequestError(ValueError):
    """The request itself is malformed (not one identifier): the route answers the protocol's error shape."""


def check_identifier_count(identifiers: object, limit: int) -> None:
    """Refuse an update with more than `limit` identifiers before any work: its answer would grow with it."""
    if isinstance(identifiers, list) and len(identifiers) > limit:
        raise RequestError(f"user_identifiers has {len(identifiers)} entries, more than the {limit} one update may "
                           "carry (FILEFEED_MAX_IDENTIFIERS_PER_UPDATE)")


@dataclass(slots=True)
class Extraction:
    rows: list[Row] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    rejected: int = 0
    ignored: int = 0


def normalize_email(email: str) -> str:
    """Trim and lowercase, as the partners' matching rules expect before hashing."""
    return email.strip().lower()


def hash_email(email: str) -> str:
    return hashlib.sha256(normalize_email(email).encode("utf-8")).hexdigest()


def _clean(value: object) -> str | None:
    """An identifier value as a string fit for a TSV journal line, or None when it cannot be one."""
    if type(value) is str:
        s = value
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        s = str(value)
    else:
        return None
    if not s or len(s) > MAX_VALUE_LENGTH:
        return None
    # For ASCII text, isprintable() is exactly "no control character": the regex only runs on other text.
    if s.isascii() and s.isprintable():
        return s
    return None if _BAD_CHARS.search(s) else s


# The tags of an accepted identifier, shared by every stat of its type (they are only serialized, never changed).
_PROCESSED_TAGS: dict[str, list[dict[str, str]]] = {}
_MAX_SHARED_TAGS = 256


def _accepted(identifier: str, id_type: str) -> dict:
    tags = _PROCESSED_TAGS.get(id_type)
    if tags is None:
        tags = [{"key": "id_type", "value": id_type}]
        if len(_PROCESSED_TAGS) < _MAX_SHARED_TAGS:
            _PROCESSED_TAGS[id_type] = tags
    return {"identifier": identifier, "sync_result": "PROCESSED", "tags": tags}


def _rejected(identifier: str, id_type: str, reason: str) -> dict:
    tags = [{"key": "id_type", "value": id_type}, {"key": "reason", "value": reason}]
    return {"identifier": identifier, "sync_result": "REJECTED", "tags": tags}


# identifier type -> (the field holding its value, the reject reason) for the types that are one plain value
_PLAIN_FIELDS = {
    "USER_POINT": ("user_point_id", "malformed_user_point_id"),
    "USER_AGENT": ("vector_id", "malformed_vector_id"),
}
# request identifier types per selectable type (device ids arrive as USER_DEVICE_POINT identifiers)
_REQUEST_TYPE = {"USER_EMAIL": "USER_EMAIL", "USER_ACCOUNT": "USER_ACCOUNT", "USER_POINT": "USER_POINT",
                 "USER_AGENT": "USER_AGENT", "USER_DEVICE_TECHNICAL_ID": "USER_DEVICE_POINT"}


class IdentifierRules:
    """Which identifiers of a request are eligible, compiled once per feed context."""

    def __init__(self, selectors: tuple[IdentifierSelector, ...], email_transform: EmailTransform | None = None):
        # a partner's normalisation + hashing of the clear address (pipeline/transforms.py); None: platform hash
        self.email_transform = email_transform
        # the request identifier types this feed takes; any other type is ignored
        self.selected = {_REQUEST_TYPE[s.type] for s in selectors if s.type in _REQUEST_TYPE}
        # None in a set means "any compartment" / "any registry type"
        self.compartments = {s.qualifier for s in selectors if s.type == "USER_ACCOUNT"}
        self.registries = {s.qualifier for s in selectors if s.type == "USER_DEVICE_TECHNICAL_ID"}

    def extract(self, identifiers: object, ts: int, session_id: str, datamart_id: str) -> Extraction:
        if not isinstance(identifiers, list):
            raise RequestError("user_identifiers must be a list")
        out = Extraction()
        user_point_id = ""
        for ident in identifiers:
            if isinstance(ident, dict) and ident.get("type") == "USER_POINT":
                user_point_id = _clean(ident.get("user_point_id")) or ""
                break
        rows, stats = out.rows, out.stats
        seen: set[tuple[str, str]] = set()
        # checked here, before anything is staged: an out-of-range ts would fail the answer or the roll later
        bad_ts = type(ts) is not int or ts < MIN_TS_MS or ts > MAX_TS_MS
        for ident in identifiers:
            for id_type, value, raw, reason in self._eligible(ident, out):
                if bad_ts and value is not None:
                    value, raw, reason = None, value, "invalid_ts"
                if value is None:
                    out.rejected += 1
                    shown = raw if isinstance(raw, str) and len(raw) <= 128 and not _BAD_CHARS.search(raw) else \
                        "<invalid>"
                    stats.append(_rejected(shown, id_type, reason))  # type: ignore[arg-type]
                    continue
                key = (id_type, value)
                if key in seen:
                    continue
                seen.add(key)
                rows.append((id_type, value, ts, session_id, datamart_id, user_point_id))
                stats.append(_accepted(value, id_type))
        return out

    def _eligible(self, ident: object, out: Extraction) -> tuple[tuple[str, str | None, object, str | None], ...]:
        """(identifier type, value, raw, reason) per identifier this one yields: value None = rejected for reason.

        Counts what is ignored (unknown or unselected types) on `out`.
        """
        t = ident.get("type") if isinstance(ident, dict) else None
        if not isinstance(ident, dict) or not isinstance(t, str) or t not in self.selected:
            out.ignored += 1  # unknown or unselected identifier types are ignored, never an error
            return ()
        plain = _PLAIN_FIELDS.get(t)
        if plain is not None:
            raw = ident.get(plain[0])
            return ((t, _clean(raw), raw, plain[1]),)
        if t == "USER_EMAIL":
            if self.email_transform is not None:
                value, reason = self.email_transform(ident)
                return (("USER_EMAIL", value, "<email>", reason),)
            h = ident.get("hash")
            if h not in (None, ""):
                if isinstance(h, str) and _HEX_HASH.fullmatch(h):
                    return (("USER_EMAIL", h.lower(), h, None),)
                return (("USER_EMAIL", None, h, "malformed_hash"),)
            email = ident.get("email")
            if isinstance(email, str) and "@" in email and _clean(normalize_email(email)):
                return (("USER_EMAIL", hash_email(email), None, None),)
            return (("USER_EMAIL", None, "<email>", "missing_or_malformed_email"),)
        if t == "USER_ACCOUNT":
            comp = ident.get("compartment_id")
            comp_s = str(comp) if comp is not None else None
            if None not in self.compartments and comp_s not in self.compartments:
                out.ignored += 1
                return ()
            raw = ident.get("user_account_id")
            return (("USER_ACCOUNT", _clean(raw), raw, "malformed_user_account_id"),)
        # USER_DEVICE_POINT: its technical identifiers of the selected registry types
        techs = ident.get("technical_identifiers")
        if not isinstance(techs, list):
            out.ignored += 1
            return ()
        found = []
        for tech in techs:
            if not isinstance(tech, dict):
                continue
            tt = tech.get("type")
            if not isinstance(tt, str) or (None not in self.registries and tt not in self.registries):
                continue
            tt_clean = _clean(tt)
            raw = tech.get("user_agent_id")
            v = _clean(raw)
            if v is None or tt_clean is None:
                found.append((str(tt_clean or "USER_DEVICE_TECHNICAL_ID"), None, raw, "malformed_user_agent_id"))
            else:
                found.append((tt_clean, v, raw, None))
        return tuple(found)
