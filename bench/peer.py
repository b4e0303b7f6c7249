"""The benchmarks' peer: a batched audience feed written with the official mediarithmics Node SDK
(bench/peers/node-sdk), started beside filefeed so bench/ingest.py and bench/batch_update.py measure both in one
command.

The SDK needs what the platform gives a plugin: PLUGIN_WORKER_ID / PLUGIN_AUTHENTICATION_TOKEN (it refuses to start
without them) and a plugin gateway that answers the feed and its properties (its instance context, fetched once per
worker and cached 10 minutes). Here the gateway is tests/service/gateway_standin.py on 127.0.0.1 (Basic auth checked),
answering feed 42 with the same identifier types and destination folder filefeed's embedded feed gets. The SDK's own
code runs unchanged; `npm ci` installs it from the committed package-lock.json on first use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / "bench" / "peers" / "node-sdk"
SDK_MARKER = PEER_DIR / "node_modules" / "@mediarithmics" / "plugins-nodejs-sdk" / "package.json"
PEERS = ("node-sdk",)


def ensure_installed() -> None:
    """`npm ci` once (the lockfile pins the SDK at 0.28.2 and everything under it)."""
    if SDK_MARKER.exists():
        return
    if not shutil.which("node") or not shutil.which("npm"):
        raise SystemExit("the node-sdk peer needs node and npm: apt-get install nodejs npm")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PEER_DIR, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)


def _property(name: str, value: str) -> dict:
    return {"technical_name": name, "property_type": "STRING", "origin": "INSTANCE", "writable": True,
            "deletable": False, "value": {"value": value}}


def start_gateway(folder: Path, identifier_types: str, feed_id: str = "42"):
    """A gateway stand-in answering `feed_id` with a local destination folder and the given identifier types."""
    from tests.service.gateway_standin import GatewayStandIn

    gw = GatewayStandIn()
    props = [_property("destination_uri", folder.as_uri()), _property("identifier_types", identifier_types)]
    gw.routes[f"GET /v1/audience_segment_external_feeds/{feed_id}/properties"] = {
        "status": "ok", "count": len(props), "data": props}
    return gw


def peer_command(port: int, gateway_port: int, base_env: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
    """The node command line, its environment and working folder for a peer listening on `port`."""
    ensure_installed()
    env = dict(base_env)
    env.update({"PLUGIN_WORKER_ID": "Calavera", "PLUGIN_AUTHENTICATION_TOKEN": "Manny",
                "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(gateway_port), "PLUGIN_PORT": str(port),
                "NODE_ENV": "production"})
    env.pop("http_proxy", None)
    env.pop("HTTP_PROXY", None)
    return ["node", "server.js"], env, PEER_DIR


def popen(port: int, gateway_port: int, base_env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd, env, cwd = peer_command(port, gateway_port, base_env)
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the cluster's primary and its workers (its own process group), then wait."""
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(15)
