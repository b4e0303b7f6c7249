"""`filefeed simulate` against a running server (2 workers), then /metrics: the sums of both workers."""

from __future__ import annotations

import json
from collections import Counter

from pipeline.ledger import Ledger, partition_dir
from pipeline.model import Partition
from tests.conftest import wait_for
from tests.ops.helpers import FEED, SEGMENT, cli, data_files, read_rows, scrape, send_users, total, update_body


def test_simulate_then_metrics(tmp_path, filefeed_factory):
    out = tmp_path / "out"
    srv = filefeed_factory(workers=2, feeds={FEED: {"destination_uri": out.as_uri(), "max_rows_per_file": 300}})
    p = cli(srv.env, "simulate", "--url", srv.url, "--users", "400", "--delete-ratio", "0.25", "--batch-size",
            "250", "--concurrency", "8", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["creation"]["status"] == "ok" and report["errors"] == []
    assert report["update_answers"] == {"200": 400}
    by_op = report["items_by_operation"]
    assert by_op["DELETE"] > 0 and by_op["UPSERT"] > by_op["DELETE"]
    assert sum(by_op.values()) == report["items"]
    assert report["sent_items_in_success"] == report["items"] and report["sent_items_in_error"] == 0

    # the summary matches the destination: every row once, per operation
    rows = [r for f in data_files(out) for r in read_rows(f)]
    assert Counter(r["operation"] for r in rows) == Counter(by_op)
    assert len({(r["operation"], r["identifier_type"], r["identifier"]) for r in rows}) == len(rows)

    # both workers took updates: the ledger's segments come from two writers
    ledgers = {op: Ledger(partition_dir(srv.staging, Partition(FEED, SEGMENT, op))).entries()
               for op in ("UPSERT", "DELETE")}
    writers = {seg.rsplit("-", 1)[0] for entries in ledgers.values() for e in entries for seg in e.segments}
    assert len(writers) >= 2, writers
    ledger_rows = sum(e.rows for entries in ledgers.values() for e in entries)
    ledger_files = sum(len(e.files) for entries in ledgers.values() for e in entries)
    ledger_bytes = sum(e.bytes for entries in ledgers.values() for e in entries)
    assert ledger_rows == report["items"] and ledger_files == len(data_files(out))

    # any worker's scrape shows the sum of both (hot-path counts reach the shared files within a second);
    # several fresh connections land on both workers
    def settled() -> bool:
        m = scrape(srv.url)
        return (total(m, "filefeed_rows_total", outcome="accepted") == report["items"]
                and total(m, "filefeed_requests_total", route="user_segment_update", code="200") == 400
                and total(m, "filefeed_requests_total", route="batch_update", code="200") == report["batches"])

    wait_for(settled, timeout=10, what="both workers' counts in the shared metric files")
    # each worker's gauge thread refreshes every FILEFEED_METRICS_REFRESH_SECONDS: wait until both show the flush
    wait_for(lambda: all(total(scrape(srv.url), "filefeed_staged_rows", feed_id=FEED) == 0 for _ in range(6)),
             timeout=30, what="both workers' gauges refreshed")
    scrapes = [scrape(srv.url) for _ in range(6)]
    for m in scrapes:
        assert total(m, "filefeed_rows_total", outcome="accepted") == report["items"]  # accepted = staged
        assert total(m, "filefeed_rows_total", outcome="rejected") == 0
        assert total(m, "filefeed_requests_total", route="user_segment_update", code="200") == 400
        assert total(m, "filefeed_requests_total", route="batch_update", code="200") == report["batches"]
        assert total(m, "filefeed_published_rows_total", scheme="file") == ledger_rows
        assert total(m, "filefeed_published_files_total", scheme="file") == ledger_files
        assert total(m, "filefeed_published_bytes_total", scheme="file") == ledger_bytes
        assert total(m, "filefeed_publish_seconds_count", scheme="file") == total(
            m, "filefeed_rolls_total", scheme="file", status="published") > 0
        assert total(m, "filefeed_staged_rows", feed_id=FEED) == 0
        assert total(m, "filefeed_failed_rolls", feed_id=FEED) == 0
        assert total(m, "filefeed_staging_disk_free_bytes") > 0
        assert total(m, "filefeed_errors_total") == 0 and total(m, "filefeed_retry_answers_total") == 0
    by_type = Counter()
    for f in data_files(out):
        for r in read_rows(f):
            by_type[r["identifier_type"]] += 1
    m = scrapes[-1]
    for id_type, n in by_type.items():
        assert total(m, "filefeed_rows_total", outcome="accepted", identifier_type=id_type) == n

    # staged gauges follow the disk; a malformed identifier is counted as rejected, by type
    staged = send_users(srv, range(1000, 1004))
    body = update_body(2000)
    body["user_identifiers"] = [{"type": "USER_EMAIL", "hash": "not-a-hash"}, *body["user_identifiers"][:1]]
    r = srv.post("/v1/user_segment_update", body)
    assert r.status_code == 200
    expected_accepted = report["items"] + len(staged) + 1
    wait_for(lambda: total(scrape(srv.url), "filefeed_rows_total", outcome="accepted") == expected_accepted,
             timeout=10, what="the new rows in the shared metric files")
    # the staged gauges come from each worker's gauge thread (FILEFEED_METRICS_REFRESH_SECONDS)
    wait_for(lambda: all(total(scrape(srv.url), "filefeed_staged_rows", feed_id=FEED) == len(staged) + 1
                         for _ in range(6)), timeout=30, what="both workers' gauges showing the new rows")
    m = scrape(srv.url)
    assert total(m, "filefeed_staged_bytes", feed_id=FEED) > 0
    assert total(m, "filefeed_oldest_staged_age_seconds", feed_id=FEED) >= 0
    assert total(m, "filefeed_rows_total", outcome="rejected", identifier_type="USER_EMAIL") == 1
    assert total(m, "filefeed_rows_total", outcome="accepted") == report["items"] + len(staged) + 1
