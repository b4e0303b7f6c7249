"""`filefeed db`: the shared database of several replicas (FILEFEED_DATABASE_URL).

    filefeed db upgrade              apply the schema migrations (every start does it too)
    filefeed db status [--json]      schema version, rolls by state, unfinished rolls, leases held now
    filefeed db resolve PARTITION ROLL --delivered | --not-delivered
                                     an operator's decision for an abandoned roll that is partly at the destination
"""

from __future__ import annotations

import typer
from rich.markup import escape

from filefeed.cli_base import EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_FAILED, OperatorError, app, out, print_json
from filefeed.cli_base import settings as checked_settings

db_app = typer.Typer(help="the shared database of several replicas (FILEFEED_DATABASE_URL)", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _say(line: str) -> None:
    out.print(escape(line), soft_wrap=True, highlight=False)


def _state():
    s = checked_settings()
    if s.database_url is None:
        raise OperatorError("filefeed: FILEFEED_DATABASE_URL is not set: this replica keeps its state on its own "
                            "volume (nothing to do here)", code=EXIT_CONFIG)
    from pipeline import shared

    try:
        return s, shared.configure(s.staging_dir, s, upgrade=False)
    except shared.SharedStateError as e:
        raise OperatorError(f"filefeed: {e}") from None


def _guard(fn, *args, **kw):
    from pipeline.shared import SharedStateError

    try:
        return fn(*args, **kw)
    except SharedStateError as e:
        raise OperatorError(f"filefeed: {e}", "  fix: start the database or correct FILEFEED_DATABASE_URL",
                            code=EXIT_ENVIRONMENT) from None


@db_app.command()
def upgrade() -> None:
    """Apply the shared database's schema migrations not applied yet."""
    from pipeline.shared import redact_url, schema

    s, state = _state()
    applied = _guard(schema.upgrade, state.db)
    where = redact_url(s.database_url.get_secret_value())
    if applied:
        _say(f"{where}: schema upgraded to version {applied[-1]} (applied {', '.join(map(str, applied))})")
    else:
        _say(f"{where}: schema at version {schema.LATEST}, up to date")


@db_app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Rolls by state, unfinished rolls (which replica, silent how long), leases held now."""
    from pipeline.shared import rolls, schema

    _, state = _state()
    version = _guard(schema.current_version, state.db)
    if version < schema.LATEST:
        raise OperatorError(f"filefeed: shared database {state.db.where} has schema version {version}, this release "
                            f"needs {schema.LATEST}", "  fix: filefeed db upgrade", code=EXIT_ENVIRONMENT)
    info = {"schema_version": version, "replica": state.replica, **_guard(rolls.summary, state)}
    if as_json:
        print_json(info)
        return
    counts = ", ".join(f"{n} {k}" for k, n in sorted(info["rolls"].items())) or "no rolls"
    _say(f"shared database {state.db.where}, schema {version}, this replica {state.replica}")
    _say(f"rolls: {counts}; {info['claims']} row claims")
    for r in info["unfinished"]:
        late = "  ABANDONED?" if r["silent_seconds"] >= info["orphan_seconds"] else ""
        _say(f"  {r['state']:<10} {r['partition']} roll {r['roll_id']} of {r['replica']}, {r['files']} files, "
            f"silent {r['silent_seconds']:.0f} s{late}")
    for lease in info["leases"]:
        _say(f"  lease      {lease['partition']} held by {lease['holder']}, {lease['expires_in_seconds']:.0f} s left")


@db_app.command()
def resolve(partition: str = typer.Argument(..., help="feed/segment/OPERATION"),
            roll_id: str = typer.Argument(..., help="the roll, as `filefeed db status` shows it"),
            delivered: bool = typer.Option(None, "--delivered/--not-delivered",
                                           help="its rows are at the destination (published), or not (released)"),
            ) -> None:
    """Decide an abandoned roll that only partly reached the destination (its replica gone for good)."""
    from pipeline.model import Partition
    from pipeline.shared import rolls
    from pipeline.shared.leases import SharedLease

    if delivered is None:
        raise OperatorError("filefeed: say --delivered (its files stay; its rows count as delivered) or "
                            "--not-delivered (remove its files at the destination first; its rows are delivered "
                            "again by whoever holds them)")
    try:
        p = Partition(*partition.split("/"))
    except (TypeError, ValueError):
        raise OperatorError(f"filefeed: {partition!r} is not feed/segment/OPERATION") from None
    _, state = _state()
    lease = _guard(SharedLease.acquire, state, p, wait_seconds=10.0)
    if lease is None:
        raise OperatorError(f"filefeed: {p}: another replica is rolling it; try again", code=EXIT_FAILED)
    try:
        result = _guard(rolls.resolve, state, lease, roll_id, delivered=delivered)
    finally:
        lease.release()
    _say(f"{p}: roll {roll_id} is {result}")
