"""Every new file-shape property through the real servers (local folder, SeaweedFS S3, OpenSSH SFTP,
fake-gcs-server): PGP, max_file_bytes, CSV dialect, `_SUCCESS` after the files as the server lists them, then a
partner profile with its identifier hashing and a separate manifest folder."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from filefeed.context import build_context
from pipeline.model import Partition
from pipeline.rollover import roll_partition
from sinks import open_sink
from sinks.base import Sink
from tests.pgp_keys import PgpKeys
from tests.rollover.helpers import make_rows, stage_segment
from tests.servers import SCHEMES, sink_props

pytestmark = [pytest.mark.servers, pytest.mark.timeout(300)]

P = Partition("feed-9", "seg-9", "UPSERT")
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


class ListingSink:
    """The real sink; when a `_SUCCESS` is published, what the server lists at that moment is recorded."""

    def __init__(self, sink: Sink):
        self._sink = sink
        self.listed_at_marker: list[set[str]] = []

    def publish(self, local_path: Path, name: str) -> Any:
        if name.endswith("_SUCCESS"):
            self.listed_at_marker.append({o.name for o in self._sink.list()})
        return self._sink.publish(local_path, name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cleanup() -> Iterator[list[Sink]]:
    sinks: list[Sink] = []
    yield sinks
    for s in sinks:
        try:
            for o in list(s.list()):
                s.remove(o.name)
        finally:
            s.close()


def test_new_properties_on_real_servers(scheme: str, servers: dict[str, str], unique_prefix: str, tmp_path: Path,
                                        pgp_keys: PgpKeys, cleanup: list[Sink]) -> None:
    root = tmp_path / "staging"
    stage_segment(root, P, "w1-000001.jnl", make_rows(3000))
    props = sink_props(scheme, servers, unique_prefix, encryption="pgp", pgp_public_key=pgp_keys.good,
                       done_marker="success_file", max_file_bytes=100_000, csv_delimiter="|", csv_header=False,
                       columns="identifier,ts", file_name_template="{segment_id}/{batch_id}/part{part}.{ext}")
    sink = open_sink(props)
    cleanup.append(sink)
    watching = ListingSink(sink)
    out = roll_partition(root, P, props, watching, now=NOW)  # type: ignore[arg-type]
    assert out.status == "published", out.error
    assert len(out.files) > 1 and all(n.endswith(".csv.gz.gpg") for n in out.files)
    folder = out.files[0].rpartition("/")[0]
    assert watching.listed_at_marker == [set(out.files)]  # every file listed by the server before the marker
    assert {o.name for o in sink.list()} == {*out.files, f"{folder}/_SUCCESS"}
    lines: list[str] = []
    for name in out.files:
        clear = gzip.decompress(pgp_keys.decrypt(sink.read(name)))
        assert len(clear) <= 100_000
        lines += clear.decode().splitlines()
    assert lines == [f"{i:064x}|{1_700_000_000_000 + i}" for i in range(3000)]

    # a profile: UID2 hashing of the clear address, manifests in their own folder
    profile = sink_props(scheme, servers, unique_prefix, partner_profile="ttd_uid2", manifest_prefix="manifests")
    ctx = build_context("feed-9", {}, {"destination_uri": "file:///unused", "partner_profile": "ttd_uid2"})
    assert ctx.rules is not None
    ex = ctx.rules.extract([{"type": "USER_EMAIL", "email": "JANE.SAOIRSE@gmail.com"}], 1, "s", "1509")
    stage_segment(root, P, "w1-000002.jnl", ex.rows)
    out2 = roll_partition(root, P, profile, sink, now=NOW.replace(hour=13))
    assert out2.status == "published", out2.error
    (name,) = out2.files
    assert gzip.decompress(sink.read(name)) == b"email_hash\nku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8=\n"
    manifest_name = f"manifests/seg-9/{out2.roll_ids[0]}.manifest.json"
    assert json.loads(sink.read(manifest_name))["files"][0]["name"] == name
