"""Destination faults against our own S3 (SeaweedFS), SFTP (sshd) and GCS (fake-gcs-server) instances, started on
other ports and state folders by scripts/start-*.sh and stopped by PID at the end.

Per destination:
1. down before a batch_update: 503 RETRY with `x-mics-next-msg-delay`, rows stay staged (nothing failed); the
   server comes back: the same batch answers OK with every item counted, each row delivered once.
2. down during a roll (killed once the first file of the roll is published): RETRY, then back + flush: once.
3. wrong credentials (S3 wrong secret, SFTP unknown key; fake-gcs-server accepts any credentials, so GCS gets a
   missing bucket): 400 ERROR, the roll in failed/ with reason.json; fixed feeds.toml + restart + `filefeed
   retry`: delivered once, and the platform's retried batch then counts every item.
4. SFTP only: the upload folder on a 512 KiB tmpfs: RETRY, nothing partial visible; tmpfs grown: delivered once.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.reliability.helpers import (
    ExtraServer,
    batch_body,
    cli_json,
    extra_server,
    feed_props,
    post,
    read_gcs,
    read_s3,
    read_sftp_local,
    record_summary,
    stage_rows,
    status_json,
    wait_all_sealed,
)

pytestmark = pytest.mark.reliability

DELAY_MS = "1234"
ENV = {"FILEFEED_SEAL_AFTER_SECONDS": "0.2", "FILEFEED_BATCH_WAIT_SECONDS": "5", "FILEFEED_RETRY_DELAY_MS": DELAY_MS}
FIGURES: dict[str, dict] = {}


@pytest.fixture(scope="module", params=["s3", "sftp", "gs"])
def dest_server(request, tmp_path_factory):
    kind = request.param
    with extra_server(kind, tmp_path_factory.mktemp(f"extra-{kind}")) as srv:
        try:
            yield srv
        finally:
            root = srv.info.get("SFTP_LOCAL_ROOT") if kind == "sftp" else None
            if root and os.path.ismount(root):
                subprocess.run(["umount", "-l", root], check=False)


def read_dest(srv: ExtraServer, prefix: str):
    if srv.kind == "s3":
        return read_s3(srv.info, prefix)
    if srv.kind == "gs":
        return read_gcs(srv.info, prefix)
    return read_sftp_local(srv.info, prefix)


def _ids(tag: str, n: int) -> list[str]:
    return [f"{tag}-{i}-{secrets.token_hex(4)}" for i in range(n)]


def _assert_once(srv: ExtraServer, prefix: str, acked: set, what: str) -> dict:
    got = read_dest(srv, prefix).check(acked)
    assert got["lost"] == 0 and got["duplicated"] == 0 and got["partial"] == 0, f"{srv.kind} {what}: {got}"
    return got


def _retry_answer(r: httpx.Response, what: str) -> None:
    assert r.status_code == 503, f"{what}: expected 503 RETRY, got {r.status_code} {r.text[:400]}"
    body = r.json()
    assert body["status"] == "RETRY" and body["sent_items_in_success"] == 0, body
    assert r.headers.get("x-mics-next-msg-delay") == DELAY_MS, dict(r.headers)
    assert set(body) <= {"status", "sent_items_in_success", "sent_items_in_error", "message"}


def _partition(st: dict, segment: str) -> dict:
    return next(p for p in st["partitions"] if p["segment_id"] == segment and p["operation"] == "UPSERT")


def test_destination_down_and_back(dest_server, group, tmp_path):
    d = dest_server
    prefix = f"down-{secrets.token_hex(4)}"
    feeds = {"42": feed_props(d.kind, d.info, prefix, max_rows_per_file=100)}
    ff = group.start(feeds=feeds, env=ENV, workers=2)
    acked: set = set()
    figures = {"faults_injected": 0}

    # 1. down before the batch
    ids = _ids("before", 600)
    items = stage_rows(ff, ids, per_request=200, segment="11")
    acked |= {("11", "UPSERT", x) for x in ids}
    d.stop()
    figures["faults_injected"] += 1
    t0 = time.monotonic()
    with ff.client() as c:
        r = post(c, "/v1/batch_update", batch_body(items, segment="11"))
    figures["retry_answer_seconds"] = round(time.monotonic() - t0, 2)
    _retry_answer(r, "destination down before the batch")
    p = _partition(status_json(ff.env), "11")
    assert p["failed_rolls"] == [] and p["delivered_rows"] == 0, p
    assert p["staged_rows"] == len(ids) or p["pending_rolls"] >= 1, f"rows not kept staged: {p}"
    d.start()
    # The roll the first batch began may still be retrying the destination when it comes back: the platform sends a
    # batch answered RETRY again, so does this test, until the answer is final (each try is bounded by the deadline)
    answers: list[httpx.Response] = []

    def resent() -> httpx.Response | None:
        with ff.client() as c:
            answers.append(post(c, "/v1/batch_update", batch_body(items, segment="11")))
        return answers[-1] if answers[-1].status_code != 503 else None

    r = wait_for(resent, 120, interval=0.5, what="the batch answered again once the destination is back")
    assert all("another roll of this partition is running" in a.text for a in answers[:-1]), [a.text for a in answers]
    assert r.status_code == 200 and r.json()["sent_items_in_success"] == len(items), r.text[:400]
    _assert_once(d, prefix, acked, "down before a batch, then back")

    # 2. down during a roll: killed once the roll's first file is published
    ids = _ids("during", 20000)
    items = stage_rows(ff, ids, per_request=1000, segment="12")
    acked |= {("12", "UPSERT", x) for x in ids}
    wait_all_sealed(ff.staging)
    answer: dict = {}

    def send():
        with httpx.Client(base_url=ff.url, timeout=300, trust_env=False) as c:
            answer["r"] = post(c, "/v1/batch_update", batch_body(items, segment="12"))

    t = threading.Thread(target=send, daemon=True)
    t.start()
    pdir = ff.staging / "feeds" / "42" / "12" / "UPSERT"
    wait_for(lambda: any(pdir.glob("rolling/*/sent/00001.json")) or "r" in answer, 120, interval=0.005,
             what="the roll's first published file")
    landed = "r" not in answer
    d.stop(9)  # SIGKILL: the destination dies mid-roll
    figures["faults_injected"] += 1
    t.join(300)
    assert not t.is_alive()
    r = answer["r"]
    figures["during_roll_answer"] = r.json().get("status")
    if landed:
        _retry_answer(r, "destination killed during the roll")
        assert any(pdir.glob("rolling/*")), "the interrupted roll must wait in rolling/"
    d.start()
    flushed = cli_json(ff.env, "flush")
    assert all(x["status"] in ("published", "nothing") for x in flushed["partitions"].values()), flushed
    with ff.client() as c:  # the platform retries the batch: every item counts now, nothing is published again
        r = post(c, "/v1/batch_update", batch_body(items, segment="12"))
    assert r.status_code == 200 and r.json()["sent_items_in_success"] == len(items), r.text[:400]
    got = _assert_once(d, prefix, acked, "killed during a roll, then back")
    verify = cli_json(ff.env, "verify")
    assert verify["problems"] == [], verify
    FIGURES.setdefault(d.kind, {}).update(figures, down_rows_checked=len(acked), down_fault_landed_mid_roll=landed,
                                          **{f"down_{k}": v for k, v in got.items()})


def _wrong(d: ExtraServer, tmp: Path) -> dict:
    if d.kind == "s3":
        return {"aws_secret_access_key": "wrong-" + secrets.token_hex(8)}
    if d.kind == "sftp":
        key = tmp / "unknown_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        return {"sftp_private_key": key.read_text()}
    return {"destination_uri": f"gs://no-such-bucket-{secrets.token_hex(4)}/x"}


def test_wrong_credentials_then_fixed(dest_server, group, tmp_path):
    d = dest_server
    prefix = f"creds-{secrets.token_hex(4)}"
    good = feed_props(d.kind, d.info, prefix)
    ff = group.start(feeds={"42": {**good, **_wrong(d, tmp_path)}}, env=ENV, workers=1)
    ids = _ids("creds", 500)
    items = stage_rows(ff, ids, per_request=250, segment="21")
    acked = {("21", "UPSERT", x) for x in ids}
    with ff.client() as c:
        r = post(c, "/v1/batch_update", batch_body(items, segment="21"))
    assert r.status_code == 400, f"wrong credentials: expected 400 ERROR, got {r.status_code} {r.text[:400]}"
    assert r.json()["status"] == "ERROR" and r.json()["sent_items_in_success"] == 0, r.text
    pdir = ff.staging / "feeds" / "42" / "21" / "UPSERT"
    failed = list(pdir.glob("failed/*/reason.json"))
    assert len(failed) == 1, f"expected one failed roll with reason.json, found {failed}"
    reason = failed[0].read_text()
    assert '"kind"' in reason and "wrong-" not in reason, reason
    p = _partition(status_json(ff.env), "21")
    assert len(p["failed_rolls"]) == 1 and p["delivered_rows"] == 0, p
    group.stop(ff)
    assert read_dest(d, prefix).files == 0
    # the operator fixes the feed and restarts filefeed, then retries the failed roll
    ff = group.start(feeds={"42": good}, env=ENV, workers=1, staging=ff.staging)
    retried = cli_json(ff.env, "retry")
    assert [x["status"] for x in retried["partitions"].values()] == ["published"], retried
    with ff.client() as c:  # the platform's retry of the batch now counts every item
        r = post(c, "/v1/batch_update", batch_body(items, segment="21"))
    assert r.status_code == 200 and r.json()["sent_items_in_success"] == len(items), r.text[:400]
    got = _assert_once(d, prefix, acked, "wrong credentials, then fixed")
    assert not list(pdir.glob("failed/*")), "the failed roll must be gone after retry"
    FIGURES.setdefault(d.kind, {}).update(creds_rows_checked=len(acked), creds_reason=reason[:200],
                                          **{f"creds_{k}": v for k, v in got.items()})


@pytest.mark.parametrize("dest_server", ["sftp"], indirect=True)  # a full remote disk is an SFTP case
def test_sftp_disk_full(dest_server, group, tmp_path):
    d = dest_server
    root = Path(d.info["SFTP_LOCAL_ROOT"])
    user = pwd.getpwnam(d.info["SFTP_USER"])
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=512k,uid={user.pw_uid},gid={user.pw_gid},mode=0755",
                        "tmpfs", str(root)], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on the SFTP upload folder (needs root and mount): {m.stderr.strip()}")
    try:
        prefix = f"full-{secrets.token_hex(4)}"
        ff = group.start(feeds={"42": feed_props(d.kind, d.info, prefix)}, env=ENV, workers=1)
        ids = [secrets.token_hex(32) for _ in range(30000)]  # ~1.2 MB of gzip: does not fit in 512 KiB
        items = stage_rows(ff, ids, per_request=1000, segment="31")
        acked = {("31", "UPSERT", x) for x in ids}
        with ff.client() as c:
            r = post(c, "/v1/batch_update", batch_body(items, segment="31"))
        _retry_answer(r, "SFTP disk full")
        full = read_dest(d, prefix)
        assert full.partial == [] and full.files == 0, f"partial files visible on a full disk: {full.partial}"
        p = _partition(status_json(ff.env), "31")
        assert p["failed_rolls"] == [] and p["pending_rolls"] == 1, p
        reason = (p.get("last_error") or {}).get("kind")
        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
        with ff.client() as c:
            r = post(c, "/v1/batch_update", batch_body(items, segment="31"))
        assert r.status_code == 200 and r.json()["sent_items_in_success"] == len(items), r.text[:400]
        got = _assert_once(d, prefix, acked, "disk full, then space")
        FIGURES.setdefault("sftp", {}).update(disk_full_rows_checked=len(acked), disk_full_error_kind=reason,
                                              **{f"disk_full_{k}": v for k, v in got.items()})
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_zz_record_figures():
    if FIGURES:
        record_summary("destination_faults", FIGURES)
    assert all(f.get("down_lost", 0) == 0 for f in FIGURES.values())
