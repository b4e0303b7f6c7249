"""A model-based test of exactly once: hypothesis interleaves updates, batches (with and without refs, duplicated,
replayed), pauses, kills and flushes against two real `filefeed serve` processes sharing one staging folder.

What must hold at the end (after every process is resumed or restarted and a last `filefeed flush`): every
acknowledged row (an update answered 200, or a ref-less batch answered OK for all its items) is in exactly one
published file; no row is published twice, acknowledged or not.

CI runs a few derandomized examples (a few minutes at most); FILEFEED_STATEFUL_EXAMPLES and FILEFEED_STATEFUL_STEPS
run more, FILEFEED_STATEFUL_RANDOM=1 draws new ones (hypothesis prints the failing steps to replay).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.reliability.helpers import (
    Group,
    batch_body,
    env_int,
    read_local,
    record_summary,
    run_cli,
    update_body,
)

pytestmark = pytest.mark.reliability

EXAMPLES = env_int("FILEFEED_STATEFUL_EXAMPLES", 3)
STEPS = env_int("FILEFEED_STATEFUL_STEPS", 12)
ENV = {"FILEFEED_BATCH_WAIT_SECONDS": "2", "FILEFEED_SEAL_AFTER_SECONDS": "1"}
TIMEOUT = 30.0


def _item(identifier: str) -> dict:
    return {"segment_id": "7", "operation": "UPSERT", "identifier_type": "USER_ACCOUNT", "identifier": identifier,
            "ts": 1717494873000, "session_id": "1", "datamart_id": "1023", "user_point_id": ""}


def make_machine(tmp: Path, totals: dict[str, int]) -> type[RuleBasedStateMachine]:
    examples = itertools.count()

    class ExactlyOnce(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = tmp / f"example-{next(examples)}"
            self.dir.mkdir()
            self.out = self.dir / "delivery"
            self.out.mkdir()
            self.feeds = {"42": {"destination_uri": self.out.as_uri(), "identifier_types": "USER_ACCOUNT"}}
            self.group = Group(self.dir)
            self.staging = self.dir / "staging"
            self.servers = [self._start(), self._start()]
            self.paused = [False, False]
            self.fresh = itertools.count()
            self.acked: set[str] = set()  # identifiers whose rows were acknowledged
            self.items: list[dict] = []  # BATCH_DELIVERY contents answered (with refs)
            self.updates: list[bytes] = []
            self.batches: list[bytes] = []
            self.last_kill = -5  # a kill restarts a server (seconds): at most one every 5 steps keeps examples short

        def _start(self):
            return self.group.start(feeds=self.feeds, env=ENV, staging=self.staging)

        def _live(self, i: int) -> bool:
            return not self.paused[i] and self.servers[i].proc.poll() is None

        def _post(self, i: int, path: str, body: bytes) -> httpx.Response | None:
            try:
                with httpx.Client(base_url=self.servers[i].url, timeout=TIMEOUT, trust_env=False) as c:
                    return c.post(path, content=body)
            except httpx.HTTPError:
                return None  # not acknowledged: its rows may or may not be delivered, never twice

        @rule(server=st.integers(0, 1), n=st.integers(1, 5))
        def update(self, server: int, n: int) -> None:
            if not self._live(server):
                return
            ids = [f"u{next(self.fresh)}" for _ in range(n)]
            body = orjson.dumps(update_body(ids))
            self.updates.append(body)
            r = self._post(server, "/v1/user_segment_update", body)
            if r is not None and r.status_code == 200:
                self.acked.update(ids)
                self.items.extend(d["content"] for d in r.json()["data"])
            totals["updates"] += 1

        @precondition(lambda self: self.updates)
        @rule(server=st.integers(0, 1), which=st.randoms(use_true_random=False))
        def retry_update(self, server: int, which: random.Random) -> None:
            if self._live(server):
                self._post(server, "/v1/user_segment_update", which.choice(self.updates))
                totals["retries"] += 1

        @precondition(lambda self: self.items)
        @rule(server=st.integers(0, 1), pick=st.randoms(use_true_random=False), with_refs=st.booleans(),
              copies=st.integers(1, 2))
        def batch_of_staged_rows(self, server: int, pick: random.Random, with_refs: bool, copies: int) -> None:
            chosen = pick.sample(self.items, min(len(self.items), pick.randint(1, 10)))
            items = chosen if with_refs else [{k: v for k, v in c.items() if k != "ref"} for c in chosen]
            body = orjson.dumps(batch_body(items))
            self.batches.append(body)
            for _ in range(copies):
                if self._live(server):
                    self._post(server, "/v1/batch_update", body)
            totals["batches"] += copies

        @rule(server=st.integers(0, 1), n=st.integers(1, 8))
        def refless_batch(self, server: int, n: int) -> None:
            if not self._live(server):
                return
            ids = [f"b{next(self.fresh)}" for _ in range(n)]
            body = orjson.dumps(batch_body([_item(i) for i in ids]))
            self.batches.append(body)
            r = self._post(server, "/v1/batch_update", body)
            if r is not None and r.status_code == 200 and r.json().get("sent_items_in_success") == n:
                self.acked.update(ids)
            totals["batches"] += 1

        @precondition(lambda self: self.batches)
        @rule(server=st.integers(0, 1), which=st.randoms(use_true_random=False))
        def replay_batch(self, server: int, which: random.Random) -> None:
            if self._live(server):
                self._post(server, "/v1/batch_update", which.choice(self.batches))
                totals["batches"] += 1

        @rule(server=st.integers(0, 1), n=st.integers(1, 5))
        def another_update(self, server: int, n: int) -> None:
            self.update(server, n)

        @rule(server=st.integers(0, 1), n=st.integers(1, 8))
        def another_refless_batch(self, server: int, n: int) -> None:
            self.refless_batch(server, n)

        @rule(server=st.integers(0, 1))
        def pause_or_resume(self, server: int) -> None:
            proc = self.servers[server].proc
            if proc.poll() is not None or (not self.paused[server] and self.paused[1 - server]):
                return  # one process stays live, so the other rules keep doing something
            os.kill(proc.pid, signal.SIGCONT if self.paused[server] else signal.SIGSTOP)
            self.paused[server] = not self.paused[server]
            totals["pauses"] += 1

        @precondition(lambda self: totals["steps"] - self.last_kill >= 5)
        @rule(server=st.integers(0, 1))
        def kill_and_restart(self, server: int) -> None:
            self.last_kill = totals["steps"]
            srv = self.servers[server]
            if self.paused[server]:
                os.kill(srv.proc.pid, signal.SIGCONT)
                self.paused[server] = False
            Group.kill9(srv)
            self.servers[server] = self._start()
            totals["kills"] += 1

        @precondition(lambda self: self.items)
        @rule()
        def flush(self) -> None:
            run_cli(self.servers[0].env, "flush", timeout=120)
            totals["flushes"] += 1

        @invariant()
        def nothing_published_twice(self) -> None:
            totals["steps"] += 1
            delivered = read_local(self.out)
            assert not delivered.duplicates(), delivered.duplicates()

        def teardown(self) -> None:
            try:
                for i, srv in enumerate(self.servers):
                    if self.paused[i] and srv.proc.poll() is None:
                        os.kill(srv.proc.pid, signal.SIGCONT)
                        self.paused[i] = False
                p = run_cli(self.servers[0].env, "flush", "--json", timeout=180)
                assert p.returncode == 0, p.stdout + p.stderr
                delivered = read_local(self.out)
                acked_rows = {("7", "UPSERT", i) for i in self.acked}
                check = delivered.check(acked_rows)
                totals["acked_rows"] += len(acked_rows)
                totals["delivered_rows"] += sum(delivered.rows.values())
                assert check["duplicated"] == 0, delivered.duplicates()
                assert check["lost"] == 0, sorted(acked_rows - set(delivered.rows))[:10]
            finally:
                self.group.close()

    return ExactlyOnce


def test_exactly_once_under_interleaved_updates_batches_pauses_kills_and_flushes(tmp_path):
    totals = dict.fromkeys(("steps", "updates", "retries", "batches", "pauses", "kills", "flushes", "acked_rows",
                            "delivered_rows"), 0)
    machine = make_machine(tmp_path, totals)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        derandomize=os.environ.get("FILEFEED_STATEFUL_RANDOM") != "1",
        database=None, suppress_health_check=list(HealthCheck), print_blob=True,
    ))
    record_summary("stateful_exactly_once", {"examples": EXAMPLES, "steps": STEPS, **totals})
