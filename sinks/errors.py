"""The one error taxonomy of filefeed: every classified failure is transient or terminal, and has a kind.

- `Transient` / `Terminal` are mixins: an error class says what it is by inheriting one (`TransientError(Transient,
  SinkError)`, `TransientRollError(Transient, RollError)`). Transient: a later attempt can succeed (the platform gets
  RETRY, the rows stay staged or in rolling/). Terminal: it cannot until someone changes something (ERROR, failed/).
- One field name per meaning, in every record and output (reason.json, last_error.json, troubleshoot, `filefeed
  status`, metrics labels, log fields):
  `severity` "transient" | "terminal"; `kind` a short word ("network", "auth", "permission", "not_found",
  "conflict", ...); `exception` the Python class that was classified (reason.json only, for a developer).
"""

from __future__ import annotations

from typing import Any, ClassVar

TRANSIENT = "transient"
TERMINAL = "terminal"
SEVERITIES = (TRANSIENT, TERMINAL)


class Classified(Exception):
    """An error that knows its severity (from its mixin) and its kind."""

    severity: ClassVar[str] = TERMINAL

    def __init__(self, message: str, *, kind: str = "error"):
        super().__init__(message)
        self.kind = kind

    @property
    def transient(self) -> bool:
        return self.severity == TRANSIENT


class Transient:
    severity: ClassVar[str] = TRANSIENT


class Terminal:
    severity: ClassVar[str] = TERMINAL


def error_fields(record: dict[str, Any] | None) -> dict[str, Any]:
    """`severity`, `kind`, `exception` of a stored error record, also from files written before the taxonomy had
    one name per meaning (then `error_class` was the severity in last_error.json and the class in reason.json)."""
    record = record or {}
    old = record.get("error_class")
    severity = record.get("severity") or (old if old in SEVERITIES else None)
    exception = record.get("exception") or (old if old not in SEVERITIES else None)
    return {"severity": severity, "kind": record.get("kind"), "exception": exception}
