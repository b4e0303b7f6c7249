"""Several writer processes on one root, and a writer killed with SIGKILL while appending."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.staging import Staging, iter_rows
from tests.staging.child_writer import PARTITIONS

CHILD = Path(__file__).with_name("child_writer.py")
ROOT_DIR = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    return subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True, env=env)


def _all_rows(root: Path) -> dict[str, list[str]]:
    """identifier -> names of the sealed segments holding it."""
    where: dict[str, list[str]] = collections.defaultdict(list)
    with Staging(root, min_free_bytes=0) as st:
        for p in PARTITIONS:
            for path in st.sealed_segments(p):
                for r in iter_rows(path):
                    where[r[1]].append(path.stem)
    return where


def test_four_writer_processes_each_row_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    procs = [_spawn(str(root), "count", f"p{k}", "2000") for k in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    with Staging(root, min_free_bytes=0) as st:
        assert all(st.open_segments(p) == [] for p in PARTITIONS)
        writers = {path.stem.rpartition("-")[0] for p in PARTITIONS for path in st.sealed_segments(p)}
    assert len(writers) == 4
    where = _all_rows(root)
    expected = {f"p{k}-{i}" for k in range(4) for i in range(2000)}
    assert set(where) == expected
    assert [ident for ident, segs in where.items() if len(segs) != 1] == []


@pytest.mark.parametrize("acks_before_kill", [200, 3000])
def test_kill_9_loses_no_acknowledged_row_and_doubles_none(tmp_path: Path, acks_before_kill: int) -> None:
    root = tmp_path / "staging"
    proc = _spawn(str(root), "ack", "k")
    acked: dict[str, str] = {}
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            seg, ident = line.split()
            acked[ident] = seg
            if len(acked) >= acks_before_kill:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # acknowledged before the kill, still in the pipe
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for line in rest.splitlines(keepends=True):
        if line.endswith("\n"):  # the kill may cut the last line short
            seg, ident = line.split()
            acked[ident] = seg

    with Staging(root, min_free_bytes=0) as st:
        report = st.recover()
        assert all(st.open_segments(p) == [] for p in PARTITIONS)
    assert report.sealed or report.removed_empty or report.truncated  # the dead writer left open segments
    where = _all_rows(root)
    missing = [i for i in acked if i not in where]
    assert missing == []
    assert [i for i, segs in where.items() if len(segs) != 1] == []
    # Each row sits in the segment its acknowledgement named.
    assert [i for i, seg in acked.items() if where[i] != [seg]] == []
