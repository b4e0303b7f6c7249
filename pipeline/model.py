"""Shared shapes of the pipeline: partitions and the staged row schema."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

OPERATIONS = ("UPSERT", "DELETE")

# Ids become folder names: keep them to a safe alphabet so nothing can escape the staging root or the prefix.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Columns of a staged row, in journal order. feed_id, segment_id and operation are the partition's, not per row.
STAGED_FIELDS = ("identifier_type", "identifier", "ts", "session_id", "datamart_id", "user_point_id")
STAGED_SCHEMA = pa.schema(
    [
        ("identifier_type", pa.string()),
        ("identifier", pa.string()),
        ("ts", pa.int64()),
        ("session_id", pa.string()),
        ("datamart_id", pa.string()),
        ("user_point_id", pa.string()),
    ]
)


def check_id(name: str, value: object) -> str:
    """Return `value` as a safe id string or raise ValueError naming the field."""
    s = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if s is None or not ID_PATTERN.fullmatch(s):
        raise ValueError(f"{name} must be 1-64 characters of letters, digits, '_' or '-'")
    return s


@dataclass(frozen=True, order=True)
class Partition:
    """Rows of one feed, one segment, one operation: one staging folder, one stream of files."""

    feed_id: str
    segment_id: str
    operation: str

    def __post_init__(self) -> None:
        check_id("feed_id", self.feed_id)
        check_id("segment_id", self.segment_id)
        if self.operation not in OPERATIONS:
            raise ValueError("operation must be UPSERT or DELETE")

    @property
    def relpath(self) -> str:
        return f"feeds/{self.feed_id}/{self.segment_id}/{self.operation}"

    def __str__(self) -> str:
        return f"{self.feed_id}/{self.segment_id}/{self.operation}"
