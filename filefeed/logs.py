"""JSON-lines logging (one object per line, like the SDK's winston console) and a run-time level shared by workers.

PUT /v1/log_level writes the level to `<staging>/run/log_level` (temp + rename); every worker follows that file, so
the level changes in all workers, not just the one that answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import orjson

# SDK (winston) level names -> Python levels
LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "http": logging.INFO,
          "verbose": logging.DEBUG, "debug": logging.DEBUG, "silly": logging.DEBUG}
_current = "info"
_EXTRA_KEYS = ("feed_id", "segment_id", "route", "outcome", "partition", "roll_id", "status", "rows", "files",
               "error_class", "worker")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname.lower().replace("warning", "warn"), "message": record.getMessage(),
               "logger": record.name, "time": round(record.created, 3), "pid": record.process}
        for key in _EXTRA_KEYS:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def _level_file(staging_dir: Path) -> Path:
    return Path(staging_dir) / "run" / "log_level"


def configure(level: str, staging_dir: Path) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # an access line per request would cost the hot path
    _apply(level)
    try:
        stored = _level_file(staging_dir).read_text().strip()
        _apply(stored)
    except OSError:
        pass


def _apply(level: str) -> bool:
    global _current
    name = level.strip().lower()
    if name == "warning":
        name = "warn"
    if name not in LEVELS:
        return False
    _current = name
    logging.getLogger().setLevel(LEVELS[name])
    for noisy in ("botocore", "boto3", "urllib3", "paramiko", "google", "s3transfer", "httpx"):
        logging.getLogger(noisy).setLevel(max(LEVELS[name], logging.WARNING))
    return True


def set_level(level: str, staging_dir: Path) -> bool:
    if not _apply(level):
        return False
    path = _level_file(staging_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".log_level.{os.getpid()}")
    tmp.write_text(_current)
    os.replace(tmp, path)
    return True


def current_level(staging_dir: Path) -> str:
    try:
        _apply(_level_file(staging_dir).read_text())
    except OSError:
        pass
    return _current.upper()


async def follow_level(staging_dir: Path, interval: float = 1.0) -> None:
    """Apply the shared level file when another worker changed it."""
    path = _level_file(staging_dir)
    seen = 0.0
    while True:
        try:
            mtime = path.stat().st_mtime
            if mtime != seen:
                seen = mtime
                _apply(path.read_text())
        except OSError:
            pass
        await asyncio.sleep(interval)


def now_ms() -> int:
    return int(time.time() * 1000)
