"""Drain on SIGTERM under load: what Kubernetes does to a pod on every rollout and scale-down.

A 2-worker server takes updates from concurrent clients with segments held open (a long seal age), gets SIGTERM
mid-load, and must: answer what is in flight (no 5xx, no answer lost for a request it accepted), seal every open
journal before its workers exit, and exit within the grace period the manifests give it
(deploy/kubernetes/filefeed.yaml: terminationGracePeriodSeconds minus the preStop sleep). A new server on the same
staging folder then delivers every acknowledged row exactly once.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.reliability.helpers import REPO, Group, post, read_local, run_cli, update_body

pytestmark = pytest.mark.reliability

MANIFEST = REPO / "deploy" / "kubernetes" / "filefeed.yaml"


def drain_budget_seconds() -> float:
    """terminationGracePeriodSeconds minus the preStop sleep: the time SIGTERM has before SIGKILL."""
    text = MANIFEST.read_text()
    grace = int(re.search(r"terminationGracePeriodSeconds:\s*(\d+)", text).group(1))
    pre_stop = int(re.search(r'command: \["sh", "-c", "sleep (\d+)"\]', text).group(1))
    return float(grace - pre_stop)


class Clients:
    def __init__(self, url: str, n: int = 6):
        self.url = url
        self.lock = threading.Lock()
        self.acked: set[tuple[str, str, str]] = set()
        self.codes: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]

    def _run(self, k: int) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=20, trust_env=False) as c:
            while True:
                ids = [f"d{k}-{i}-{j}" for j in range(2)]
                seg = str(7 + (i % 3))
                i += 1
                try:
                    r = post(c, "/v1/user_segment_update", update_body(ids, segment=seg))
                except httpx.HTTPError:
                    return  # the server stopped accepting: this request was never acknowledged
                with self.lock:
                    self.codes[r.status_code] = self.codes.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        self.acked.update((seg, "UPSERT", x) for x in ids)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def test_sigterm_under_load_drains_within_the_grace_period(tmp_path: Path) -> None:
    dest = tmp_path / "delivery"
    group = Group(tmp_path)
    try:
        feeds = {"42": {"destination_uri": dest.as_uri(), "identifier_types": "USER_ACCOUNT"}}
        # Segments stay open for the whole load: only the drain can seal them.
        srv = group.start(feeds=feeds, workers=2, env={"FILEFEED_SEAL_AFTER_SECONDS": "300"})
        clients = Clients(srv.url)
        for t in clients.threads:
            t.start()
        wait_for(lambda: clients.count() >= 2_000, 60, what="2,000 acknowledged rows before SIGTERM")
        staging = srv.staging
        assert any(p.is_file() for p in staging.rglob("open/*")), "the load must leave open journals to seal"

        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        budget = drain_budget_seconds()
        srv.proc.wait(budget + 5)
        took = time.monotonic() - t0
        for t in clients.threads:
            t.join(30)

        assert took < budget, f"the drain took {took:.1f} s, more than the {budget:.0f} s the manifests allow"
        assert srv.proc.returncode == 0, f"serve exited {srv.proc.returncode}:\n{srv.log_text()[-3000:]}"
        assert not any(code >= 500 for code in clients.codes), f"answers during the drain: {clients.codes}"
        left_open = [p for p in staging.rglob("open/*") if p.is_file()]
        assert not left_open, f"journals left open after a clean exit: {left_open[:5]}"

        # Everything acknowledged before and during the drain goes out exactly once.
        p = run_cli(srv.env, "flush", timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        got = read_local(dest).check(clients.acked)
        assert got == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}, got
        assert clients.count() >= 2_000
    finally:
        group.close()
