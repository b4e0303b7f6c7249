"""Leftovers at the partner (issue 13, finding 8), against the real sshd, SeaweedFS and a local folder.

A process publishing through filefeed's sink is killed (-9) mid-upload: an SFTP or local dot-temp file, or an
incomplete S3 multipart upload, stays at the destination. Next to it sit leftovers that are NOT filefeed's (a temp
file of our naming in a folder outside the feed's naming, another client's multipart upload). Then:
- `filefeed verify` reports the feed's own leftover once it is older than FILEFEED_LEFTOVER_AGE_SECONDS (exit 1);
- the next roll to the destination removes it, and only it; verify is clean again.
(GCS: an abandoned resumable session holds no object and cannot be listed; nothing is left to clean.)
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.reliability.helpers import REPO, batch_body, cli_json, feed_props, post, run_cli, s3_client, stage_rows

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

AGE = 2.0
ENV = {"FILEFEED_SEAL_AFTER_SECONDS": "0.2", "FILEFEED_LEFTOVER_AGE_SECONDS": str(AGE)}
SEGMENT = "71"
# a name the feed's default template renders for SEGMENT (the roll id shape of pipeline.rollover.make_roll_id)
OWN_NAME = f"{SEGMENT}/20250101T000000Z_UPSERT_20250101T000000-0123456789_part00001.csv.gz"

CHILD = r"""
import json, sys, time
from pathlib import Path
from config.feed import parse_feed_properties
from sinks import open_sink

props = parse_feed_properties(json.loads(sys.argv[1]))
src, name = Path(sys.argv[2]), sys.argv[3]


class Slow:  # the first 6 MiB at once, then a trickle: the upload is in flight when we are killed
    def __init__(self, f):
        self.f, self.sent = f, 0
    def read(self, n=-1):
        if self.sent >= 6 << 20:
            time.sleep(0.2)
        data = self.f.read(n if n and n > 0 else 1 << 20)
        self.sent += len(data)
        return data
    def readinto(self, b):
        data = self.read(len(b)); b[:len(data)] = data; return len(data)
    def tell(self):
        return self.f.tell()
    def seek(self, *a):
        return self.f.seek(*a)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        self.f.close()


sink = open_sink(props)
sink.open_source = lambda p: Slow(open(p, "rb"))
if hasattr(sink, "link_sources"):
    sink.link_sources = False
if hasattr(sink, "transfer_config"):
    from boto3.s3.transfer import TransferConfig
    sink.transfer_config = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1)
print("publishing", flush=True)
sink.publish(src, name)
"""


def _props(kind: str, servers: dict[str, str], prefix: str, tmp: Path) -> dict:
    if kind == "file":
        root = tmp / "delivery"
        root.mkdir(exist_ok=True)
        return {"destination_uri": f"file://{root}", "identifier_types": "USER_ACCOUNT"}
    return feed_props(kind, servers, prefix)


class Destination:
    """Raw access to the destination, not through filefeed."""

    def __init__(self, kind: str, servers: dict[str, str], prefix: str, props: dict):
        self.kind, self.servers, self.prefix = kind, servers, prefix
        if kind == "file":
            self.root = Path(props["destination_uri"].removeprefix("file://"))
        elif kind == "sftp":
            self.root = Path(servers["SFTP_LOCAL_ROOT"]) / prefix

    def temps(self) -> list[str]:
        if self.kind == "s3":
            s3 = s3_client(self.servers)
            ups = s3.list_multipart_uploads(Bucket=self.servers["S3_BUCKET"], Prefix=self.prefix + "/")
            return sorted(u["Key"][len(self.prefix) + 1:] for u in ups.get("Uploads", []) or [])
        if not self.root.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob(".*") if p.is_file())

    def plant_foreign(self) -> str:
        """A leftover that is not this feed's: outside its naming (another writer's folder)."""
        if self.kind == "s3":
            s3 = s3_client(self.servers)
            s3.create_multipart_upload(Bucket=self.servers["S3_BUCKET"], Key=f"{self.prefix}/other/upload.bin")
            return "other/upload.bin"
        folder = self.root / "other"
        folder.mkdir(parents=True, exist_ok=True)
        name = ".upload.bin.filefeed-tmp-0123456789ab"
        (folder / name).write_bytes(b"not ours")
        if self.kind == "sftp":
            st = os.stat(self.root)
            os.chown(folder, st.st_uid, st.st_gid)
            os.chown(folder / name, st.st_uid, st.st_gid)
        old = time.time() - 3600
        os.utime(folder / name, (old, old))
        return f"other/{name}"

    def cleanup(self) -> None:
        if self.kind == "s3":
            s3 = s3_client(self.servers)
            ups = s3.list_multipart_uploads(Bucket=self.servers["S3_BUCKET"], Prefix=self.prefix + "/")
            for u in ups.get("Uploads", []) or []:
                s3.abort_multipart_upload(Bucket=self.servers["S3_BUCKET"], Key=u["Key"], UploadId=u["UploadId"])


def _leftovers(verify: dict) -> list[dict]:
    return [p for p in verify["problems"] if p["problem"] == "leftover"]


@pytest.mark.parametrize("kind", ["sftp", "s3", "file"])
def test_kill_mid_upload_leftover_reported_then_removed(kind, servers, group, tmp_path):
    prefix = f"leftover-{secrets.token_hex(4)}"
    props = _props(kind, servers, prefix, tmp_path)
    dest = Destination(kind, servers, prefix, props)
    try:
        ff = group.start(feeds={"42": props}, env=ENV, workers=1)
        ids = [f"lo-{i}" for i in range(50)]
        items = stage_rows(ff, ids, per_request=50, segment=SEGMENT)  # the feed's segment is staged here

        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(24 << 20))
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(props), str(big), OWN_NAME],
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: dest.temps() or child.poll() is not None, 60, interval=0.05,
                     what="the upload to be in flight")
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        own = dest.temps()
        assert len(own) == 1, own
        foreign = dest.plant_foreign()
        time.sleep(AGE + 0.5)

        verify = cli_json(ff.env, "verify", ok_codes=(1,))
        found = _leftovers(verify)
        assert len(found) == 1, verify["problems"]
        assert own[0] in found[0]["name"] or OWN_NAME in found[0]["name"], (own, found)

        with ff.client() as c:  # the next roll to this destination
            r = post(c, "/v1/batch_update", batch_body(items, segment=SEGMENT))
        assert r.status_code == 200 and r.json()["sent_items_in_success"] == len(items), r.text[:300]
        left = dest.temps()
        assert own[0] not in left, left
        assert foreign in left, f"a leftover that is not the feed's was removed: {left}"
        verify = cli_json(ff.env, "verify")
        assert _leftovers(verify) == [], verify["problems"]
        p = run_cli(ff.env, "verify")
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        dest.cleanup()
