"""A snapshot feed end to end through `filefeed serve`: updates and batches over HTTP, one full file per delivery,
then `filefeed verify` and `filefeed retry` see the SNAPSHOT folder's ledger."""

from __future__ import annotations

import json

from tests.ops.helpers import FEED, SEGMENT, cli, send_batch, send_users
from tests.rollover.helpers import decode_file, destination_files


def test_snapshot_feed_through_the_service(tmp_path, filefeed_factory) -> None:
    out = tmp_path / "out"
    srv = filefeed_factory(workers=2, feeds={FEED: {"destination_uri": out.as_uri(), "delivery_mode": "snapshot",
                                                    "file_name_template": "{segment_id}/{mode}_{batch_id}_{part}.{ext}"}})
    upserts = send_users(srv, range(0, 30))
    first = send_batch(srv, upserts)
    assert (first["status"], first["sent_items_in_success"]) == ("OK", len(upserts))
    deletes = send_users(srv, range(0, 10), op="DELETE")  # the same users leave the segment, later
    second = send_batch(srv, deletes, op="DELETE")
    assert (second["status"], second["sent_items_in_success"]) == ("OK", len(deletes))
    files = destination_files(out)
    # in the order they were written (names agree since roll ids carry milliseconds: tests/rollover/test_rollover.py)
    data = sorted((n for n in files if not n.endswith(".manifest.json")), key=lambda n: (out / n).stat().st_mtime_ns)
    assert len(data) == 2 and all(n.startswith(f"{SEGMENT}/full_") for n in data)
    first_ids = {r["identifier"] for r in decode_file(data[0], files[data[0]])}
    second_ids = {r["identifier"] for r in decode_file(data[1], files[data[1]])}
    removed = {x["identifier"] for x in deletes}
    assert len(first_ids) == len(upserts) and second_ids == first_ids - removed and removed <= first_ids
    again = send_batch(srv, upserts)  # a replayed batch: counted, and no new delivery
    assert again["sent_items_in_success"] == len(upserts) and len(destination_files(out)) == len(files)
    verified = cli(srv.env, "verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["checked"] >= 4  # both snapshots and their manifests
    assert cli(srv.env, "retry").returncode == 0
    status = json.loads(cli(srv.env, "status", "--json").stdout)
    upsert = next(p for p in status["partitions"] if p["operation"] == "UPSERT")
    assert upsert["last_delivery"]["files"] == [data[1]]  # the latest snapshot, not an apply roll
