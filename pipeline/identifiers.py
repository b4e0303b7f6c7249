"""user_segment_update request -> staged rows. The hot path: plain dict lookups, no model per identifier."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from config.feed import IdentifierSelector

_HEX_HASH = re.compile(r"(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64}|[0-9a-fA-F]{128})")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_VALUE_LENGTH = 1024

# A staged row: (identifier_type, identifier, ts, session_id, datamart_id, user_point_id), STAGED_FIELDS order.
Row = tuple[str, str, int, str, str, str]


class RequestError(ValueError):
    """The request itself is malformed (not one identifier): the route answers the protocol's error shape."""


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
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    s = str(value)
    if not s or len(s) > MAX_VALUE_LENGTH or _BAD_CHARS.search(s):
        return None
    return s


def _stat(identifier: str, id_type: str, ok: bool, reason: str | None = None) -> dict:
    tags = [{"key": "id_type", "value": id_type}]
    if reason:
        tags.append({"key": "reason", "value": reason})
    return {"identifier": identifier, "sync_result": "PROCESSED" if ok else "REJECTED", "tags": tags}


class IdentifierRules:
    """Which identifiers of a request are eligible, compiled once per feed context."""

    def __init__(self, selectors: tuple[IdentifierSelector, ...]):
        self.email = any(s.type == "USER_EMAIL" for s in selectors)
        self.agent = any(s.type == "USER_AGENT" for s in selectors)
        self.point = any(s.type == "USER_POINT" for s in selectors)
        accounts = [s for s in selectors if s.type == "USER_ACCOUNT"]
        self.account = bool(accounts)
        # None in the set means "any compartment"
        self.compartments = {s.qualifier for s in accounts}
        devices = [s for s in selectors if s.type == "USER_DEVICE_TECHNICAL_ID"]
        self.device = bool(devices)
        self.registries = {s.qualifier for s in devices}

    def extract(self, identifiers: object, ts: int, session_id: str, datamart_id: str) -> Extraction:
        if not isinstance(identifiers, list):
            raise RequestError("user_identifiers must be a list")
        out = Extraction()
        seen: set[tuple[str, str]] = set()
        user_point_id = ""
        for ident in identifiers:
            if isinstance(ident, dict) and ident.get("type") == "USER_POINT":
                user_point_id = _clean(ident.get("user_point_id")) or ""
                break

        def add(id_type: str, value: str) -> None:
            key = (id_type, value)
            if key in seen:
                return
            seen.add(key)
            out.rows.append((id_type, value, ts, session_id, datamart_id, user_point_id))
            out.stats.append(_stat(value, id_type, True))

        def reject(id_type: str, raw: object, reason: str) -> None:
            out.rejected += 1
            shown = raw if isinstance(raw, str) and len(raw) <= 128 and not _BAD_CHARS.search(raw) else "<invalid>"
            out.stats.append(_stat(shown, id_type, False, reason))

        for ident in identifiers:
            if not isinstance(ident, dict):
                out.ignored += 1
                continue
            t = ident.get("type")
            if t == "USER_EMAIL":
                if not self.email:
                    out.ignored += 1
                    continue
                h = ident.get("hash")
                if h not in (None, ""):
                    if isinstance(h, str) and _HEX_HASH.fullmatch(h):
                        add("USER_EMAIL", h.lower())
                    else:
                        reject("USER_EMAIL", h, "malformed_hash")
                    continue
                email = ident.get("email")
                if isinstance(email, str) and "@" in email and _clean(normalize_email(email)):
                    add("USER_EMAIL", hash_email(email))
                else:
                    reject("USER_EMAIL", "<email>", "missing_or_malformed_email")
            elif t == "USER_ACCOUNT":
                if not self.account:
                    out.ignored += 1
                    continue
                comp = ident.get("compartment_id")
                comp_s = str(comp) if comp is not None else None
                if None not in self.compartments and comp_s not in self.compartments:
                    out.ignored += 1
                    continue
                v = _clean(ident.get("user_account_id"))
                if v is None:
                    reject("USER_ACCOUNT", ident.get("user_account_id"), "malformed_user_account_id")
                else:
                    add("USER_ACCOUNT", v)
            elif t == "USER_DEVICE_POINT":
                if not self.device:
                    out.ignored += 1
                    continue
                techs = ident.get("technical_identifiers")
                if not isinstance(techs, list):
                    out.ignored += 1
                    continue
                for tech in techs:
                    if not isinstance(tech, dict):
                        continue
                    tt = tech.get("type")
                    if not isinstance(tt, str) or (None not in self.registries and tt not in self.registries):
                        continue
                    tt_clean = _clean(tt)
                    v = _clean(tech.get("user_agent_id"))
                    if v is None or tt_clean is None:
                        reject(str(tt_clean or "USER_DEVICE_TECHNICAL_ID"), tech.get("user_agent_id"),
                               "malformed_user_agent_id")
                    else:
                        add(tt_clean, v)
            elif t == "USER_AGENT":
                if not self.agent:
                    out.ignored += 1
                    continue
                v = _clean(ident.get("vector_id"))
                if v is None:
                    reject("USER_AGENT", ident.get("vector_id"), "malformed_vector_id")
                else:
                    add("USER_AGENT", v)
            elif t == "USER_POINT":
                if not self.point:
                    out.ignored += 1
                    continue
                v = _clean(ident.get("user_point_id"))
                if v is None:
                    reject("USER_POINT", ident.get("user_point_id"), "malformed_user_point_id")
                else:
                    add("USER_POINT", v)
            else:
                out.ignored += 1  # unknown identifier types are ignored, never an error
        return out
