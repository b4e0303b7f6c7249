"""What the commands say: each error once with the command that fixes it, one label per error, an error gone once
fixed, readable verify lines, the demo's data where `status` looks, piped lines never wrapped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.ops.helpers import FEED, SEGMENT, cli, data_files, send_users, troubleshoot


def test_failed_flush_told_once_with_retry_then_gone(tmp_path: Path, filefeed_factory) -> None:
    out = tmp_path / "out"
    out.mkdir()
    blocker = out / SEGMENT  # a file where the segment's folder must go: every publish fails terminally
    blocker.write_text("not a folder")
    srv = filefeed_factory(feeds={FEED: {"destination_uri": out.as_uri()}})
    send_users(srv, range(5))

    p = cli(srv.env, "flush")
    text = p.stdout + p.stderr
    assert p.returncode == 1 and "Traceback" not in text, text
    assert text.count("not_found") == 1, text  # once, not three times
    assert f"`filefeed retry --feed {FEED}`" in text and "terminal not_found" in text, text

    st = cli(srv.env, "status")
    assert st.returncode == 0
    assert st.stdout.count("not_found") == 1 and "TerminalError" not in st.stdout, st.stdout  # one label
    assert f"filefeed retry --feed {FEED}" in st.stdout

    blocker.unlink()
    p = cli(srv.env, "retry")
    assert p.returncode == 0 and "published" in p.stdout, p.stdout + p.stderr
    st = cli(srv.env, "status")
    assert "not_found" not in st.stdout and "error" not in st.stdout, st.stdout  # the old error is history
    assert troubleshoot(srv)["data"]["last_errors"] == []

    # verify: readable lines, plural right
    assert re.search(r"verified \d+ files \(\d+ objects listed\): 0 problems", cli(srv.env, "verify").stdout)
    gone = data_files(out)[0]
    gone.unlink()
    v = cli(srv.env, "verify")
    assert v.returncode == 1, v.stdout
    assert f"missing: {gone.relative_to(out)} (feed {FEED}, partition {FEED}/{SEGMENT}/UPSERT, roll " in v.stdout
    assert v.stdout.rstrip().endswith(": 1 problem"), v.stdout
    assert "{'" not in v.stdout and "'}" not in v.stdout, v.stdout


def test_demo_stages_where_status_looks(tmp_path: Path) -> None:
    """`filefeed demo` then `FILEFEED_FEEDS=config/feeds.toml filefeed status` in the same folder shows its data;
    the file count matches the list; piped at COLUMNS=80, a suggested command is one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_", "GATEWAY_"))}
    env.update({"PYTHONPATH": str(ROOT), "COLUMNS": "80", "FILEFEED_MIN_FREE_BYTES": "0"})
    here = tmp_path / "a-rather-long-folder-name-for-the-operator-s-checkout" / "filefeed"
    here.mkdir(parents=True)
    demo = subprocess.run([sys.executable, "-m", "filefeed", "demo", "--users", "300", "--batch-size", "100"],
                          env=env, cwd=str(here), capture_output=True, text=True, timeout=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    feeds = ROOT / "config" / "feeds.toml"
    assert f"FILEFEED_FEEDS={feeds} filefeed status" in demo.stdout, demo.stdout  # the environment to reuse

    count = re.search(r"feed 42: (\d+) files in (\S+?)(, the last (\d+))?:\n", demo.stdout)
    assert count, demo.stdout
    listed = [line for line in demo.stdout.splitlines() if re.match(r"  \S+  [\d,]+ B$", line)]
    assert len(listed) == int(count[4] or count[1]), demo.stdout
    delivered = sorted(p for p in Path(count[2]).rglob("*") if p.is_file())
    assert len(delivered) == int(count[1]) and Path(count[2]) == here / "var" / "delivery"
    see = [line for line in demo.stdout.splitlines() if "(see one: filefeed inspect " in line]
    assert len(see) == 1 and Path(see[0].split("inspect ", 1)[1].rstrip(")")).is_file(), demo.stdout

    st = subprocess.run([sys.executable, "-m", "filefeed", "status", "--json"], env={**env, "FILEFEED_FEEDS": str(
        feeds)}, cwd=str(here), capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    import json

    parts = json.loads(st.stdout)["partitions"]
    assert parts and sum(p["delivered_rows"] for p in parts) > 0, st.stdout
