"""JSON-lines logging (one object per line, like the SDK's winston console) and a run-time level shared by workers.

PUT /v1/log_level writes the level to `<staging>/run/log_level` (temp + rename); every worker follows that file, so
the level changes in all workers, not just the one that answered. Each worker writes one line when it applies a new
level (whatever the level: the change itself is always recorded), so an operator sees every worker switch.
`filefeed serve` forgets the previous run's file (`start_run`): FILEFEED_LOG_LEVEL is the initial level of each run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from config.settings import LOG_LEVELS as LEVELS

_current = "info"
_EXTRA_KEYS = ("feed_id", "segment_id", "route", "outcome", "code", "ms", "partition", "roll_id", "status", "rows",
               "files", "severity", "kind", "worker")
log = logging.getLogger("filefeed.logs")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"level": record.levelname.lower().replace("warning", "warn"),
                               "message": record.getMessage(), "logger": record.name,
                               "time": round(record.created, 3), "pid": record.process}
        for key in _EXTRA_KEYS:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def _level_file(staging_dir: Path | str) -> Path:
    return Path(staging_dir) / "run" / "log_level"


def configure(level: str, staging_dir: Path) -> None:
    """JSON lines on stderr at `level`, or at the run-time level another worker of this run already set."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # an access line per request would cost the hot path
    _apply(level)
    stored = _read(staging_dir)
    if stored:
        _apply(stored)


def start_run(staging_dir: Path | str) -> None:
    """Forget the run-time level of a previous run (called once by `filefeed serve` before workers start)."""
    try:
        _level_file(staging_dir).unlink()
    except FileNotFoundError:
        pass


def _normalize(level: str) -> str | None:
    name = level.strip().lower()
    if name == "warning":
        name = "warn"
    return name if name in LEVELS else None


def _apply(level: str) -> bool:
    global _current
    name = _normalize(level)
    if name is None:
        return False
    _current = name
    logging.getLogger().setLevel(LEVELS[name])
    for noisy in ("botocore", "boto3", "urllib3", "paramiko", "google", "s3transfer", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(LEVELS[name], logging.WARNING))
    return True


def _announce(previous: str, how: str) -> None:
    """One line saying this process changed level, written whatever the level (handlers, not the logger)."""
    record = log.makeRecord(log.name, logging.WARNING, __file__, 0, "log level changed from %s to %s (%s)",
                            (previous, _current, how), None)
    record.route = "log_level"
    record.outcome = _current
    for handler in logging.getLogger().handlers:
        handler.handle(record)


def _read(staging_dir: Path | str) -> str | None:
    try:
        return _normalize(_level_file(staging_dir).read_text())
    except OSError:
        return None


def set_level(level: str, staging_dir: Path) -> bool:
    """Apply `level` here and publish it to the other workers; False for an unknown level name."""
    previous = _current
    if not _apply(level):
        return False
    path = _level_file(staging_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".log_level.{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_text(_current)
    os.replace(tmp, path)
    if previous != _current:
        _announce(previous, "PUT /v1/log_level")
    return True


def current_level(staging_dir: Path) -> str:
    """The run's level (the shared file wins: another worker may have changed it a moment ago)."""
    stored = _read(staging_dir)
    if stored and stored != _current:
        previous = _current
        _apply(stored)
        _announce(previous, "set by another worker")
    return _current.upper()


async def follow_level(staging_dir: Path, interval: float = 0.5) -> None:
    """Apply the shared level file when another worker changed it."""
    while True:
        stored = _read(staging_dir)
        if stored and stored != _current:
            previous = _current
            _apply(stored)
            _announce(previous, "set by another worker")
        await asyncio.sleep(interval)


def request_level(code: int) -> int:
    """The level of an answered request's line: DEBUG when it went well, WARNING for 5xx, INFO for other 4xx."""
    return logging.DEBUG if code < 400 or code in (429, 503) else logging.WARNING if code >= 500 else logging.INFO


def log_request(logger: logging.Logger, route: str, code: int, seconds: float, *, feed_id: Any = None,
                segment_id: Any = None, outcome: str | None = None) -> None:
    """The line of one answered feed request, at `request_level(code)`.

    Cheap when the level filters it out (one isEnabledFor), so it can sit on the hot path.
    """
    level = request_level(code)
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {"route": route, "code": code, "ms": round(seconds * 1000, 2),
                             "outcome": outcome or ("ok" if code < 400 else "error")}
    if isinstance(feed_id, (str, int)) and not isinstance(feed_id, bool):
        extra["feed_id"] = str(feed_id)[:64]
    if isinstance(segment_id, (str, int)) and not isinstance(segment_id, bool):
        extra["segment_id"] = str(segment_id)[:64]
    logger.log(level, "%s answered %d", route, code, extra=extra)


def now_ms() -> int:
    return int(time.time() * 1000)
