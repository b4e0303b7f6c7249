"""The `filefeed` command line: serve, flush, status, inspect, retry, verify, simulate, demo.

Every command reads the same settings as the server (FILEFEED_STAGING_DIR, FILEFEED_FEEDS, the platform variables)
and is safe to run while the server runs: rolls take the partition's lease, reads never take one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config.settings import ServiceSettings, SettingsError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="filefeed: mediarithmics segments as files.")
console = Console(stderr=False)
err = Console(stderr=True)


def _settings() -> ServiceSettings:
    try:
        return load_settings()
    except SettingsError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def serve(
    workers: int = typer.Option(None, help="worker processes (default FILEFEED_WORKERS or 1)"),
    host: str = typer.Option(None, help="bind address (default FILEFEED_HOST, 0.0.0.0)"),
    port: int = typer.Option(None, help="port (default PLUGIN_PORT, 8080)"),
) -> None:
    """Run the plugin HTTP server."""
    settings = _settings()
    import uvicorn

    from filefeed import logs, metrics

    logs.start_run(settings.staging_dir)
    metrics.prepare_multiprocess_dir(settings.staging_dir)
    from filefeed import server

    server.run(
        uvicorn.Config(
            "filefeed.app:create_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=workers or settings.workers,
            loop="uvloop",
            http=server.HTTP_PROTOCOL,
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=10,
        )
    )


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8080", help="base URL of a running filefeed"),
    users: int = typer.Option(1000, help="user_segment_update calls (one user each)"),
    delete_ratio: float = typer.Option(0.0, min=0.0, max=1.0, help="share of DELETE operations"),
    batch_size: int = typer.Option(1000, min=1, help="items per batch_update (the platform's batch_flush_max_size)"),
    feed_id: str = typer.Option("42"),
    segment_id: str = typer.Option("451256"),
    concurrency: int = typer.Option(32, min=1, max=256),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Play the platform against a running filefeed: creation, connection, updates, batches."""
    from filefeed.simulate import simulate as run

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=as_json) as progress:
        task = progress.add_task("user_segment_update", total=users)
        report = asyncio.run(run(url, feed_id=feed_id, segment_id=segment_id, users=users, delete_ratio=delete_ratio,
                                 batch_size=batch_size, concurrency=concurrency,
                                 progress=lambda n: progress.advance(task, n)))
    data = report.as_dict()
    if as_json:
        _print_json(data)
    else:
        table = Table(title="simulation", show_header=False)
        for k, v in data.items():
            table.add_row(k, str(v))
        console.print(table)
    if report.errors or report.creation.get("status") != "ok":
        raise typer.Exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"filefeed serve exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/status", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("filefeed serve did not become ready")


@app.command()
def demo(
    users: int = typer.Option(10_000, help="users to simulate"),
    delete_ratio: float = typer.Option(0.1, min=0.0, max=1.0),
    batch_size: int = typer.Option(2_000, min=1),
    workers: int = typer.Option(2, min=1),
) -> None:
    """The whole job on the embedded default: serve config/feeds.toml, simulate the platform, show the files."""
    here = Path.cwd()
    env = dict(os.environ)
    env.setdefault("FILEFEED_FEEDS", str(Path(__file__).resolve().parent.parent / "config" / "feeds.toml"))
    env.setdefault("FILEFEED_STAGING_DIR", str(here / "var" / "staging"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(env["FILEFEED_STAGING_DIR"]).parent / "serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]filefeed demo[/bold]: feeds {env['FILEFEED_FEEDS']}, staging {env['FILEFEED_STAGING_DIR']}, "
                  f"server {url} ({workers} workers, log {log_path})")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", str(workers)], env=env, stdout=logf, stderr=logf)
    try:
        _wait_ready(url, proc)
        from filefeed.simulate import simulate as run

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err) as progress:
            task = progress.add_task("platform -> filefeed", total=users)
            report = asyncio.run(run(url, users=users, delete_ratio=delete_ratio, batch_size=batch_size,
                                     progress=lambda n: progress.advance(task, n)))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    data = report.as_dict()
    rate = users / report.seconds if report.seconds else 0
    console.print(f"{users} users in {report.seconds:.1f} s ({rate:,.0f} updates/s); "
                  f"{report.items} rows; {report.batches} batch_update calls: "
                  f"sent_items_in_success={report.sent_items_in_success} "
                  f"sent_items_in_error={report.sent_items_in_error}; answers {data['batch_answers']}")
    os.environ.update({k: env[k] for k in ("FILEFEED_FEEDS", "FILEFEED_STAGING_DIR")})
    status(feed=None, as_json=False)
    from config.feed import parse_destination
    from filefeed.context import load_embedded_feeds

    for feed_id, table in load_embedded_feeds(Path(env["FILEFEED_FEEDS"])).items():
        dest = parse_destination(table["destination_uri"])
        if dest.scheme == "file":
            files = sorted(p for p in Path(dest.path).rglob("*") if p.is_file())
            console.print(f"feed {feed_id}: {len(files)} files in {dest.path}")
            for p in files[-6:]:
                console.print(f"  {p.relative_to(dest.path)}  {p.stat().st_size:,} B")
            data_files = [p for p in files if not p.name.endswith(".manifest.json")]
            if data_files:
                console.print(f"  (see one: filefeed inspect {data_files[-1]})")
    if report.errors or report.sent_items_in_success != report.items:
        err.print(f"[red]demo incomplete: {report.errors[:3]}[/red]")
        raise typer.Exit(1)


from filefeed import ops_cli  # noqa: E402  - registers status, inspect, flush, retry, verify on `app`

status = ops_cli.status


def main() -> None:
    app()


if __name__ == "__main__":
    main()
