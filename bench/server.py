"""`filefeed serve` for the benchmarks: started in its own session on embedded feeds, stopped by its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.ingest import free_port, wait_ready
from tests.reliability.helpers import write_feeds

ROOT = Path(__file__).resolve().parent.parent


def start_server(tmp: Path, staging: Path, feeds: dict[str, dict], *, workers: int = 1, repo: Path = ROOT,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Serve `feeds` (embedded) on `staging` with `repo`'s code; (process, base URL) once it answers."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_", "GATEWAY_"))}
    full.update({"FILEFEED_FEEDS": str(write_feeds(tmp / f"feeds-{port}.toml", feeds)),
                 "FILEFEED_STAGING_DIR": str(staging), "FILEFEED_MIN_FREE_BYTES": "0",
                 "FILEFEED_LOG_LEVEL": "WARNING", "FILEFEED_FLUSH_CHECK_SECONDS": "3600", "PYTHONPATH": str(repo)})
    full.update(env or {})
    with open(tmp / f"serve-{port}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", str(workers)], env=full, cwd=str(repo), stdout=log,
                                stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
