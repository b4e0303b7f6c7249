"""What every `filefeed` command shares: the Typer app, the consoles, the settings check, and how a problem is told.

A configuration, usage or environment problem is one or a few plain lines (what, where, how to fix) and a non-zero
exit code, never a traceback; `--debug` (or FILEFEED_LOG_LEVEL=DEBUG) shows the traceback as well.
Exit codes: 1 the work failed (a roll, a verification), 2 configuration or usage, 3 environment (a folder that cannot
be written, a server that does not answer), 70 an internal error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from config.problems import ConfigFileError
from config.settings import ServiceSettings, SettingsError, load_settings


class _Typer(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # the console script calls the app: handled as main()
        return main()


app = _Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="filefeed: mediarithmics segments as files.")
console = Console(stderr=False)
err = Console(stderr=True, highlight=False)
# A pipe or a file gets lines that are never wrapped (a suggested command stays one piece); a terminal gets its width.
out = console if console.is_terminal else Console(width=10_000, soft_wrap=True, highlight=False)

EXIT_FAILED, EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_INTERNAL = 1, 2, 3, 70


class OperatorError(Exception):
    """A problem the operator fixes: `lines` are printed as they are, then the command exits with `code`."""

    def __init__(self, *lines: str, code: int = EXIT_CONFIG):
        self.lines = [line for line in lines if line]
        self.code = code
        super().__init__("; ".join(self.lines))


def settings(*, write: bool = False, shared: bool = False) -> ServiceSettings:
    """The validated settings; the embedded feeds file readable; the staging folder usable (writable if `write`);
    with `shared` (commands that roll), the shared database reachable and its schema upgraded."""
    try:
        s = load_settings()
    except SettingsError as e:
        raise OperatorError("filefeed: invalid settings (environment or FILEFEED_CONFIG):",
                            *(f"  {p}" for p in e.problems)) from None
    if s.feeds is not None:
        from filefeed.context import load_embedded_feeds

        try:
            load_embedded_feeds(s.feeds)
        except ConfigFileError as e:
            raise OperatorError(f"filefeed: {e}") from None
    check_staging_dir(s.staging_dir, write=write)
    from pipeline import delivery, ledger, recent_rows, snapshot  # late: the CLI starts fast

    delivery.configure(s)  # sink deadlines and leftover age, as in the server
    ledger.configure(s.ledger_retention_days)
    recent_rows.configure(s.dedup_seconds, s.dedup_max_rows)  # `filefeed flush` rolls like the server
    snapshot.configure(s.snapshot_tombstone_days)
    if shared:
        connect_shared(s)
    return s


def connect_shared(s: ServiceSettings) -> None:
    """FILEFEED_DATABASE_URL: reachable, schema upgraded, the staging root's rolls sharing it; one line if not."""
    if s.database_url is None:
        return
    from pipeline import shared as shared_state

    try:
        shared_state.configure(s.staging_dir, s)
    except shared_state.SharedStateError as e:
        raise OperatorError(f"filefeed: {e}",
                            "  fix: start the database or correct FILEFEED_DATABASE_URL (the role needs no "
                            "superuser: it owns its database)", code=EXIT_ENVIRONMENT) from None


def check_staging_dir(root: Path, *, write: bool) -> None:
    """The staging folder exists (created if missing) and, when `write`, accepts a file."""
    where = f"FILEFEED_STAGING_DIR={root}"
    fix = "point FILEFEED_STAGING_DIR at a folder filefeed may write (default ./var)"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if write:
            probe = root / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise OperatorError(f"filefeed: {where}: cannot {'write' if write else 'create'} it "
                            f"({e.strerror or e}); {fix}", code=EXIT_ENVIRONMENT) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FILEFEED_LOG_LEVEL", "").strip().lower() == "debug"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the traceback of an error")) -> None:
    """filefeed: mediarithmics segments as files."""


def main(argv: list[str] | None = None) -> None:
    """Run the command line; every known problem becomes plain lines and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(args)
    if "--debug" in args:  # accepted anywhere on the line, as a global option
        args = ["--debug", *(a for a in args if a != "--debug")]
    # The pipeline's log lines would repeat what the command prints (a failed roll three times): commands print
    # their own outcome; --debug shows the log too. `serve` installs the JSON log lines.
    root = logging.getLogger()
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    elif not root.handlers:
        root.addHandler(logging.NullHandler())
    try:
        typer.Typer.__call__(app, args=args, prog_name="filefeed", standalone_mode=True)
    except SystemExit:
        raise
    except OperatorError as e:
        _show(e.lines, debug)
        sys.exit(e.code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a defect of filefeed, not of the operator's setup: still one line by default
        _show([f"filefeed: internal error: {type(e).__name__}: {e}", "  (rerun with --debug for the traceback)"],
              debug)
        sys.exit(EXIT_INTERNAL)


def _show(lines: list[str], debug: bool) -> None:
    if debug:
        traceback.print_exc()
    for line in lines:
        sys.stderr.write(line + "\n")
