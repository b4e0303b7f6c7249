"""A replica killed mid-roll whose volume is lost for good: what it acknowledged and the platform batches again
reaches the destination once, through the other replicas.

Its roll was recorded as publishing, so the others wait (RETRY) until it has been silent for the orphan time, then
look its files up at the destination: none there -> its rows are taken back and delivered by whoever holds them;
its data files there -> its missing manifest is published from the recorded bytes and its rows count as delivered;
only some of its data files there -> an operator decides (`filefeed db resolve`).
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import wait_for
from tests.reliability.helpers import read_local, run_cli
from tests.shared.helpers import batch, flush, two_replicas, update
from tests.shared.test_partition import roll_state

pytestmark = pytest.mark.reliability

CLEAN = {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}


def lose_replica(group, srv) -> None:
    group.kill9(srv)
    shutil.rmtree(srv.staging)


def wait_orphaned(database: str) -> None:
    wait_for(lambda: all(age > 8.5 for _, s, age in roll_state(database, "a") if s == "publishing"), 30,
             what="replica a's roll to be silent beyond the orphan time")


@pytest.mark.parametrize("crash_at", ["publishing", "publish:1"])
def test_volume_lost_mid_roll_rows_arrive_once(group, tmp_path, database, crash_at):
    dest, a, b = two_replicas(group, tmp_path, database, database)
    ids = [f"v{i}" for i in range(25)]
    items = update(a, ids)
    assert flush(a, env={"FILEFEED_CRASH_AT": crash_at}).returncode == 137
    lose_replica(group, a)
    held = batch(b, items)
    assert held["status"] == "RETRY" and "held by roll" in held.get("message", ""), held
    wait_orphaned(database)
    answer = batch(b, items)
    assert answer["status"] == "OK" and answer["sent_items_in_success"] == 25, answer
    delivered = read_local(dest)
    assert delivered.check({("7", "UPSERT", i) for i in ids}) == CLEAN
    assert delivered.files and delivered.manifests == delivered.files  # one manifest per roll of one file
    states = {s for _, s, _ in roll_state(database, "a")}
    assert states == ({"released"} if crash_at == "publishing" else {"published"}), states


def test_volume_lost_with_part_of_its_files_published_waits_for_the_operator(group, tmp_path, database):
    dest, a, b = two_replicas(group, tmp_path, database, database, props={"max_rows_per_file": 10})
    ids = [f"p{i}" for i in range(25)]
    items = update(a, ids)
    assert flush(a, env={"FILEFEED_CRASH_AT": "publish:1"}).returncode == 137  # 1 of its 3 files published
    lose_replica(group, a)
    wait_orphaned(database)
    held = batch(b, items)
    assert held["status"] == "RETRY" and "only part of its files" in held.get("message", ""), held
    (roll_id, _, _), = roll_state(database, "a")
    p = run_cli(b.env, "db", "status")
    assert p.returncode == 0 and roll_id in p.stdout and "ABANDONED?" in p.stdout, p.stdout + p.stderr
    # the operator removes the part that was published, then says so: its rows are delivered again by b
    for f in [f for f in dest.rglob("*") if f.is_file()]:
        f.unlink()
    p = run_cli(b.env, "db", "resolve", "42/7/UPSERT", roll_id, "--not-delivered")
    assert p.returncode == 0 and "released" in p.stdout, p.stdout + p.stderr
    answer = batch(b, items)
    assert answer["status"] == "OK" and answer["sent_items_in_success"] == 25, answer
    assert read_local(dest).check({("7", "UPSERT", i) for i in ids}) == CLEAN
