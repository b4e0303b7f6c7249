"""Deterministic remote names for the files of a roll, rendered from the feed's `file_name_template`.

Every value comes from the roll (its id and planned time, fixed in plan.json) or the partition, never from the clock
at publish time: a roll resumed after a crash renders exactly the same names, which is what makes publishing
idempotent, as Kafka Connect's S3 sink does by naming files from the data's own offsets.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime

from config.feed import TEMPLATE_MACROS
from pipeline.model import OPERATIONS, Partition
from sinks.base import name_problem

MAX_NAME_LENGTH = 1024
# Values that come from row data (datamart_id) are reduced to this alphabet so they cannot add path segments.
_UNSAFE_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


class UnsafeNameError(ValueError):
    """A rendered name that must not be published (path escape, hidden file, NUL, too long)."""


@dataclass(frozen=True)
class NameContext:
    """The values of a roll that names are rendered from."""

    partition: Partition
    batch_id: str
    planned_at: datetime
    extension: str
    file_format: str
    datamart_id: str = ""
    mode: str = "delta"  # {mode}: "delta" (add/remove files) or "full" (a snapshot of every member)

    def values(self, part: int | str) -> dict[str, str]:
        planned = self.planned_at.astimezone(UTC)
        return {
            "feed_id": self.partition.feed_id,
            "segment_id": self.partition.segment_id,
            "operation": self.partition.operation,
            "datamart_id": safe_value(self.datamart_id) or "unknown",
            "date": planned.strftime("%Y%m%d"),
            "time": planned.strftime("%H%M%S"),
            "batch_id": self.batch_id,
            "part": f"{part:05d}" if isinstance(part, int) else part,
            "ext": self.extension,
            "format": self.file_format,
            "mode": self.mode,
        }


def safe_value(value: str) -> str:
    return _UNSAFE_VALUE.sub("_", value).strip(".")


def render_name(template: str, context: NameContext, part: int) -> str:
    """The remote name of file number `part` (1-based) of the roll; raises UnsafeNameError for an unsafe result."""
    if part < 1:
        raise ValueError("part numbers start at 1")
    return check_name(_render(template, context.values(part)))


def manifest_name(file_names: list[str], batch_id: str, prefix: str | None = None) -> str:
    """`[<prefix>/]<folder of the first file>/<batch_id>.manifest.json`: beside the files it lists (or under a
    separate `manifest_prefix` folder, for drop folders that load every file they see), unique per roll.

    A separate name (not the template with a fake part) keeps partners' `*.csv.gz`-style globs from matching it
    and lets a consumer find every manifest with `*.manifest.json`.
    """
    folder = file_names[0].rpartition("/")[0] if file_names else ""
    name = "/".join(p for p in (prefix, folder, f"{batch_id}.manifest.json") if p)
    return check_name(name)


def roll_folders(file_names: list[str]) -> list[str]:
    """The folders the files of a roll are in, in first-seen order ("" for the destination's root)."""
    return list(dict.fromkeys(name.rpartition("/")[0] for name in file_names))


def _render(template: str, values: dict[str, str]) -> str:
    out: list[str] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if field is None:
            continue
        if field not in TEMPLATE_MACROS:
            raise UnsafeNameError(f"unknown macro {{{field}}} in file_name_template")
        value = values[field]
        if conversion:
            raise UnsafeNameError(f"conversions such as !{conversion} are not supported in file_name_template")
        out.append(format(value, spec) if spec else value)
    return "".join(out)


def check_name(name: str) -> str:
    """Refuse names that could escape the destination prefix, hide as temp files, or break a filesystem."""
    problem = name_problem(name)
    if problem:
        raise UnsafeNameError(f"rendered file name {problem}")
    if len(name) > MAX_NAME_LENGTH:
        raise UnsafeNameError(f"rendered file name is longer than {MAX_NAME_LENGTH} characters")
    if any(segment.startswith(".") for segment in name.split("/")):
        # Sinks publish through dot-prefixed temp names; a final name must never look like one.
        raise UnsafeNameError("rendered file name has a path segment starting with '.'")
    return name


# -- the grammar of rendered names, for `filefeed verify` to recognise this feed's objects ---------------------------
# What each macro of NameContext.values renders to; a macro added there without a pattern here matches one segment.
BATCH_ID_PATTERN = r"\d{8}T\d{6}(?:\d{3})?-[0-9a-f]{10}"  # rollover.make_roll_id (milliseconds), slot_roll_id
MACRO_PATTERNS = {
    "feed_id": r"[^/]+",
    "segment_id": r"[A-Za-z0-9_-]+",
    "operation": "(?:" + "|".join(OPERATIONS) + ")",
    "datamart_id": r"[A-Za-z0-9_.-]+",  # safe_value's alphabet
    "date": r"\d{8}",
    "time": r"\d{6}",
    "batch_id": BATCH_ID_PATTERN,
    "part": r"\d{5,}",
    "ext": r"[A-Za-z0-9.]+",
    "format": "(?:csv|parquet)",
    "mode": "(?:delta|full)",
}


def _template_pattern(template: str, fixed: dict[str, list[str]]) -> str:
    parts: list[str] = []
    for literal, field, spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if spec:  # a format spec reshapes the value: any text within one segment
            parts.append(r"[^/]+?")
        elif fixed.get(field):
            parts.append("(?:" + "|".join(re.escape(v) for v in fixed[field]) + ")")
        else:
            parts.append(MACRO_PATTERNS.get(field, r"[^/]+"))
    return "".join(parts)


def name_pattern(template: str, fixed: dict[str, list[str]]) -> re.Pattern[str]:
    """A regex matching every data file and manifest `template` renders, macros in `fixed` limited to its values
    (e.g. {"feed_id": ["42"], "segment_id": ["451256"]})."""
    folder = template.rpartition("/")[0]
    folder_re = _template_pattern(folder, fixed) + "/" if folder else ""
    return re.compile(f"(?:{_template_pattern(template, fixed)}|{folder_re}{BATCH_ID_PATTERN}\\.manifest\\.json)")


def listing_prefixes(template: str, fixed: dict[str, str]) -> list[str]:
    """Where the names of one partition can be listed: the template's leading literals and the macros in `fixed`."""
    prefix: list[str] = []
    for literal, field, spec, _conv in string.Formatter().parse(template):
        prefix.append(literal)
        if field is None:
            continue
        if field in fixed and fixed[field] and not spec:
            prefix.append(fixed[field])
            continue
        break
    return ["".join(prefix)]
