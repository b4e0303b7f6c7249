"""Several replicas, one truth: the state that decides exactly once, shared in PostgreSQL (FILEFEED_DATABASE_URL).

Staging stays local (a 2xx still means "fsynced on this replica's volume": the hot path makes no database call);
what several replicas must agree on lives in the database:

    leases    one row per partition: who may roll it now, until when (the database's clock), and a fencing token
              that grows with every new holder
    rolls     the shared ledger: every roll of every replica, its state (claiming -> publishing -> published, or
              released), the files it publishes, its entry once published
    claims    one row per staged row a roll delivers: (partition, 64-bit row hash) -> roll. The row hash covers ts,
              identifier, identifier type and session (pipeline.recent_rows.row_hashes), so a row staged on replica A
              and delivered from a batch by replica B, or an update retried on another replica, has one claim.

A roll claims its rows while it encodes, under the partition's lease; a row claimed by a published roll is dropped
(delivered already), a row claimed by a roll that is not running and never started publishing is taken back from
it, a row claimed by a roll that is publishing waits (the batch answers RETRY) until that roll ends, or until it has
been silent for FILEFEED_DATABASE_ORPHAN_SECONDS and its files are looked up at the destination (pipeline.shared.
rolls). Every state change is a transaction that first locks the partition's lease row and checks the holder's token,
so a replica that lost its lease (cut off, frozen) changes nothing; before each file it publishes, the holder renews
its lease, so a zombie stops publishing within one lease period of losing the database.
"""

from pipeline.shared.db import Database, SharedLeaseLost, SharedStateError, redact_url
from pipeline.shared.state import SharedState, configure, for_root, forget

__all__ = [
    "Database",
    "SharedLeaseLost",
    "SharedState",
    "SharedStateError",
    "configure",
    "for_root",
    "forget",
    "redact_url",
]
