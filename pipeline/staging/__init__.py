"""Durable, partitioned staging: rows are fsynced to disk before a request is acknowledged.

Layout under the staging root (state lives in folder names, so `ls` and `head` tell an operator everything; the
names come from pipeline/layout.py)::

    journal/open/<writer>-<seq>.jnl                     one per live writer, flocked: rows of every partition, each
                                                        frame tagged with its partition; sealed by age or size, then
                                                        split (and removed) by its writer
    feeds/<feed>/<segment>/<op>/sealed/<writer>-<seq>.jnl   one partition's rows of that journal: ready for a roll
    quarantine/<feed>/<segment>/<op>/<name>.jnl + .report.json   damaged segments, kept for inspection
    quarantine/journal/<name>.jnl + .report.json        damaged journals (their good frames were split)

Modules, one job each: commit (append + group commit), dedup, pressure (backpressure), sealing (seal requests and
waits), split (journal -> sealed segments), recovery + quarantine, listing, reading; writer holds the Staging facade.
"""

from __future__ import annotations

from pipeline.journal import clean_value, is_clean_value
from pipeline.layout import OPEN, SEALED, SUFFIX
from pipeline.staging.reading import count_rows, first_row, iter_batches, iter_rows, verify_segment
from pipeline.staging.results import (
    AppendResult,
    CorruptSegment,
    PartitionStats,
    RecoveryReport,
    StagingClosed,
    StagingFull,
)
from pipeline.staging.writer import Staging

__all__ = [
    "OPEN",
    "SEALED",
    "SUFFIX",
    "AppendResult",
    "CorruptSegment",
    "PartitionStats",
    "RecoveryReport",
    "Staging",
    "StagingClosed",
    "StagingFull",
    "clean_value",
    "count_rows",
    "is_clean_value",
    "first_row",
    "iter_batches",
    "iter_rows",
    "verify_segment",
]
