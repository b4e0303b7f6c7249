"""Delivered files read where they are, through smart-open, with the feed's credentials: `filefeed inspect` of an
s3:// / gs:// / sftp:// URL (CSV gzip, CSV zstd, Parquet) and `verify`'s deep check streaming the remote bytes, against
the real SeaweedFS, fake-gcs-server and OpenSSH sshd."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.ops.helpers import FEED, cli, cli_json, raw_props, send_batch, send_users

CASES = [("s3", {"file_format": "csv", "compression": "gzip"}),
         ("gs", {"file_format": "parquet", "compression": "zstd"}),
         ("sftp", {"file_format": "csv", "compression": "zstd"})]


@pytest.mark.parametrize(("scheme", "shape"), CASES, ids=[c[0] for c in CASES])
def test_inspect_and_verify_remote(tmp_path: Path, filefeed_factory, servers, unique_prefix, scheme: str,
                                   shape: dict[str, str]) -> None:
    props = raw_props(scheme, servers, unique_prefix, max_rows_per_file=30, **shape)
    other = raw_props("file", {**servers, "FILE_ROOT": str(tmp_path)}, "other")  # a second feed: not this URL's
    srv = filefeed_factory(feeds={FEED: props, "43": other})
    items = send_users(srv, range(12))
    answer = send_batch(srv, items)
    assert answer["status"] == "OK" and answer["sent_items_in_success"] == len(items), answer

    part = next(p for p in cli_json(srv.env, "status")["partitions"] if p["operation"] == "UPSERT")
    names = part["last_delivery"]["files"]
    assert len(names) >= 2  # split at 30 rows
    base = props["destination_uri"].rstrip("/")
    seen: Counter = Counter()
    for name in names:
        url = f"{base}/{name}"
        p = cli(srv.env, "inspect", url, "--json", "--limit", "0")  # the feed found by its destination_uri
        assert p.returncode == 0, p.stdout + p.stderr
        rows = [json.loads(line) for line in p.stdout.splitlines()]
        seen.update(r["identifier"] for r in rows)
        assert all(isinstance(r["identifier"], str) for r in rows)
    assert seen == Counter(x["identifier"] for x in items)

    table = cli(srv.env, "inspect", f"{base}/{names[-1]}", "--feed", FEED, "--limit", "3")  # named feed, a table
    assert table.returncode == 0 and rows[0]["identifier"][:12] in table.stdout, table.stdout + table.stderr
    wrong = cli(srv.env, "inspect", f"{base}/{names[0]}", "--feed", "43")
    assert wrong.returncode == 2 and "not under feed 43" in wrong.stderr and "Traceback" not in wrong.stderr
    missing = cli(srv.env, "inspect", f"{base}/{names[0]}.nothing.csv.gz")
    assert missing.returncode == 3 and "(not_found)" in missing.stderr and "Traceback" not in missing.stderr, (
        missing.stderr)
    nowhere = cli(srv.env, "inspect", "s3://no-such-feed-bucket/x.csv.gz")
    assert nowhere.returncode == 2 and "no feed's destination_uri holds" in nowhere.stderr

    ok = json.loads(cli(srv.env, "verify", "--json", "--feed", FEED).stdout)
    assert ok["ok"] and ok["problems"] == [] and ok["checked"] == len(names) + 1, ok  # + the manifest


def test_verify_streams_sftp_bytes_and_sees_corruption(tmp_path: Path, filefeed_factory, servers,
                                                       unique_prefix) -> None:
    """The deep check hashes what the server holds: flip one byte (same size) in the sshd's folder."""
    props = raw_props("sftp", servers, unique_prefix)
    srv = filefeed_factory(feeds={FEED: props})
    items = send_users(srv, range(6))
    assert send_batch(srv, items)["status"] == "OK"
    name = next(p for p in cli_json(srv.env, "status")["partitions"])["last_delivery"]["files"][0]
    assert cli(srv.env, "verify").returncode == 0
    local = Path(servers["SFTP_LOCAL_ROOT"]) / unique_prefix / name
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    local.write_bytes(bytes(data))
    v = cli(srv.env, "verify")
    assert v.returncode == 1 and f"checksum mismatch: {name} (feed {FEED}" in v.stdout, v.stdout + v.stderr
    shallow = cli(srv.env, "verify", "--no-deep")
    assert shallow.returncode == 0, shallow.stdout  # sizes agree: only the bytes tell
