"""A replica cut off from the database while it holds a partition's lease (a frozen TCP proxy between it and
PostgreSQL), and a replica killed mid-roll: the others deliver its rows once, and the zombie publishes nothing
after losing its lease.

The cut-off replica's `filefeed flush` is paused at a named point of its roll (FILEFEED_PAUSE_AT, a test hook)
while the proxy is frozen, so the test knows exactly what it held.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from tests.conftest import wait_for
from tests.reliability.helpers import REPO, read_local
from tests.shared.conftest import via
from tests.shared.helpers import batch, flush, two_replicas, update

pytestmark = pytest.mark.reliability


def roll_state(url: str, replica: str) -> list[tuple[str, str, float]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return [(r[0], r[1], float(r[2])) for r in conn.execute(
            "SELECT roll_id, state, extract(epoch FROM now() - heartbeat_at) FROM rolls WHERE replica = %s",
            (replica,)).fetchall()]


def paused_flush(srv, point: str, flag) -> subprocess.Popen:
    flag.touch()
    env = {**srv.env, "FILEFEED_PAUSE_AT": f"{point}:{flag}"}
    return subprocess.Popen([sys.executable, "-m", "filefeed", "flush"], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def once(dest, ids) -> dict:
    return read_local(dest).check({("7", "UPSERT", i) for i in ids})


@pytest.mark.parametrize("point", ["encode", "publishing"])
def test_replica_cut_off_holding_the_lease_never_publishes_after_losing_it(group, tmp_path, database, db_proxy,
                                                                          point):
    """encode: its roll holds claims, nothing recorded to publish -> taken back at once by the other replica.
    publishing: its files are recorded -> the others wait (RETRY) until it is silent for the orphan time, find
    none of its files at the destination, and take its rows back."""
    dest, a, b = two_replicas(group, tmp_path, via(database, db_proxy), database)
    ids = [f"z{i}" for i in range(25)]
    items = update(a, ids)
    flag = tmp_path / "paused"
    zombie = paused_flush(a, point, flag)
    wanted = "claiming" if point == "encode" else "publishing"
    wait_for(lambda: any(s == wanted for _, s, _ in roll_state(database, "a")), 30,
             what=f"replica a's roll to be {wanted}")
    wait_for(lambda: (a.staging / "feeds/42/7/UPSERT/rolling").exists()
             and any((p / "encoded.json").exists() for p in (a.staging / "feeds/42/7/UPSERT/rolling").iterdir()),
             30, what="replica a's roll to be encoded")
    db_proxy.freeze()  # a keeps its connections; nothing it sends reaches PostgreSQL any more
    first = batch(b, items)
    if point == "publishing":
        assert first["status"] == "RETRY" and first["http"] == 503, first
        assert "held by roll" in first.get("message", ""), first
        # silent beyond FILEFEED_DATABASE_ORPHAN_SECONDS (8 s here): none of its files at the destination
        wait_for(lambda: all(age > 8.5 for _, s, age in roll_state(database, "a") if s == "publishing"), 30,
                 what="replica a's roll to be silent beyond the orphan time")
        first = batch(b, items)
    assert first["status"] == "OK" and first["sent_items_in_success"] == 25, first
    assert once(dest, ids) == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}
    files_before = sorted(p.name for p in dest.rglob("*") if p.is_file())
    flag.unlink()  # the zombie goes on: it must renew its lease before publishing, and cannot
    out, _ = zombie.communicate(timeout=60)
    assert zombie.returncode != 0, out
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == files_before, "the zombie published"
    db_proxy.thaw()
    p = flush(a)  # back in touch: its roll was taken back; encoded again, every row already delivered
    assert p.returncode == 0, p.stdout + p.stderr
    assert once(dest, ids) == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == files_before
    assert not any((a.staging / "feeds/42/7/UPSERT/rolling").glob("[!.]*"))


def test_replica_killed_mid_publish_resumes_and_others_wait(group, tmp_path, database):
    dest, a, b = two_replicas(group, tmp_path, database, database)
    ids = [f"k{i}" for i in range(25)]
    items = update(a, ids)
    p = flush(a, env={"FILEFEED_CRASH_AT": "publish:1"})  # dies like kill -9 after its data file
    assert p.returncode == 137, p.stdout + p.stderr
    held = batch(b, items)
    assert held["status"] == "RETRY", held  # its roll is publishing, not silent for long: B waits
    p = flush(a)  # the replica back: resumes its roll, same names, same bytes
    assert p.returncode == 0, p.stdout + p.stderr
    answer = batch(b, items)
    assert answer["status"] == "OK" and answer["sent_items_in_success"] == 25, answer
    assert once(dest, ids) == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}
    assert os.listdir(dest)
