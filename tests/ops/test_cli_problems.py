"""Configuration, usage and environment problems, as an operator meets them: every command says what, where and how
to fix in a few plain lines, exits non-zero, and never prints a traceback (unless --debug)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

FEED_OK = '[feeds.42]\ndestination_uri = "file:{out}"\n'


def run(tmp: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m filefeed ARGS` in `tmp` with only the given filefeed variables (none inherited)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_", "GATEWAY_"))}
    full["PYTHONPATH"] = str(ROOT)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "filefeed", *args], env=full, cwd=str(tmp), capture_output=True,
                          text=True, timeout=timeout)


def assert_plain(p: subprocess.CompletedProcess, code: int, *needles: str, max_lines: int = 4) -> str:
    text = p.stdout + p.stderr
    assert p.returncode == code, f"exit {p.returncode}, wanted {code}:\n{text}"
    assert "Traceback" not in text and 'File "' not in text, text
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= max_lines, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


@pytest.fixture
def feeds(tmp_path: Path) -> Path:
    path = tmp_path / "feeds.toml"
    path.write_text(FEED_OK.format(out=tmp_path / "out"))
    return path


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["flush"], ["status"], ["retry"], ["verify"],
                                     ["inspect", "42"]])
def test_feeds_file_missing(tmp_path: Path, command: list[str]) -> None:
    p = run(tmp_path, *command, env={"FILEFEED_FEEDS": "missing.toml"})
    assert_plain(p, 2, "FILEFEED_FEEDS=missing.toml", "no such file")


@pytest.mark.parametrize("command", [["flush"], ["status"], ["serve", "--port", "1"]])
def test_feeds_file_toml_syntax_error(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "bad.toml").write_text('[feeds.42]\ndestination_uri = "file:out\nfile_format = "csv"\n')
    p = run(tmp_path, *command, env={"FILEFEED_FEEDS": "bad.toml"})
    assert_plain(p, 2, "bad.toml:2:", "TOML syntax error", "FILEFEED_FEEDS")


def test_config_file_toml_syntax_error(tmp_path: Path, feeds: Path) -> None:
    (tmp_path / "settings.toml").write_text('FILEFEED_STAGING_DIR = "var\n')
    p = run(tmp_path, "flush", env={"FILEFEED_CONFIG": "settings.toml", "FILEFEED_FEEDS": str(feeds)})
    assert_plain(p, 2, "settings.toml:1:", "TOML syntax error", "FILEFEED_CONFIG")


def test_config_file_missing_is_an_error(tmp_path: Path, feeds: Path) -> None:
    p = run(tmp_path, "status", env={"FILEFEED_CONFIG": "nowhere.toml", "FILEFEED_FEEDS": str(feeds)})
    assert_plain(p, 2, "FILEFEED_CONFIG=nowhere.toml", "no such file")


def test_config_file_keys_are_the_environment_names(tmp_path: Path, feeds: Path) -> None:
    staging = tmp_path / "elsewhere"
    (tmp_path / "settings.toml").write_text(f'FILEFEED_STAGING_DIR = "{staging}"\nFILEFEED_FEEDS = "{feeds}"\n')
    p = run(tmp_path, "status", "--json", env={"FILEFEED_CONFIG": "settings.toml"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["staging_dir"] == str(staging)


def test_config_file_unknown_key_names_the_closest_setting(tmp_path: Path, feeds: Path) -> None:
    (tmp_path / "settings.toml").write_text('FILEFEED_STAGNG_DIR = "x"\nstaging_dir = "y"\n')
    p = run(tmp_path, "status", env={"FILEFEED_CONFIG": "settings.toml", "FILEFEED_FEEDS": str(feeds)})
    text = assert_plain(p, 2, "unknown setting FILEFEED_STAGNG_DIR (did you mean FILEFEED_STAGING_DIR?)",
                        "unknown setting staging_dir (did you mean FILEFEED_STAGING_DIR?)")
    assert "settings.toml" in text


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["flush"], ["status"], ["retry"]])
def test_unusable_staging_dir(tmp_path: Path, feeds: Path, command: list[str]) -> None:
    (tmp_path / "a-file").write_text("")  # as root no permission bit stops us: a file where a folder should be
    p = run(tmp_path, *command, env={"FILEFEED_FEEDS": str(feeds), "FILEFEED_STAGING_DIR": "a-file/staging"})
    assert_plain(p, 3, "FILEFEED_STAGING_DIR=a-file/staging", "Not a directory")


def test_log_level_unknown(tmp_path: Path, feeds: Path) -> None:
    for command in (["status"], ["serve", "--port", "1"]):
        p = run(tmp_path, *command, env={"FILEFEED_FEEDS": str(feeds), "FILEFEED_LOG_LEVEL": "LOUD"})
        assert_plain(p, 2, "FILEFEED_LOG_LEVEL", "unknown level", "DEBUG")


def test_simulate_without_a_server(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as s:  # nothing listens on it: the port is bound but not listening
        s.bind(("127.0.0.1", port))
        p = run(tmp_path, "simulate", "--users", "3", "--url", f"http://127.0.0.1:{port}")
    assert_plain(p, 3, f"http://127.0.0.1:{port}", "filefeed serve")


def test_gateway_mode_without_credentials(tmp_path: Path) -> None:
    p = run(tmp_path, "status")
    assert_plain(p, 2, "PLUGIN_WORKER_ID", "FILEFEED_FEEDS")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for env in ({"FILEFEED_FEEDS": "missing.toml"}, {"FILEFEED_FEEDS": "missing.toml", "FILEFEED_LOG_LEVEL": "DEBUG"}):
        args = ["status", "--debug"] if "FILEFEED_LOG_LEVEL" not in env else ["status"]
        p = run(tmp_path, *args, env=env)
        assert p.returncode == 2 and "Traceback" in p.stderr and "FILEFEED_FEEDS=missing.toml" in p.stderr


def test_embedded_unknown_property_is_an_error_with_the_closest_name(tmp_path: Path, filefeed_factory) -> None:
    out = tmp_path / "out"
    srv = filefeed_factory(feeds={"42": {"destination_uri": out.as_uri(), "file_fromat": "parquet"},
                                  "43": {"destination_uri": out.as_uri()}})
    answer = srv.post("/v1/external_segment_creation", {"feed_id": "42", "datamart_id": "1", "segment_id": "7"})
    body = answer.json()
    assert body["status"] == "error" and "file_fromat: unknown property (did you mean file_format?)" in body["message"]
    ok = srv.post("/v1/external_segment_creation", {"feed_id": "43", "datamart_id": "1", "segment_id": "7"})
    assert ok.json()["status"] == "ok"  # the other feed is served
    log = srv.log_text()
    warning = next(json.loads(line) for line in log.splitlines() if "file_fromat" in line)
    assert warning["level"] == "warn" and warning["feed_id"] == "42" and "did you mean file_format?" in warning[
        "message"]


def test_gateway_unknown_property_is_a_warning(tmp_path: Path, filefeed_factory) -> None:
    from tests.service.gateway_standin import GatewayStandIn

    gw = GatewayStandIn()
    feed = "/v1/audience_segment_external_feeds/42"
    gw.routes[f"GET {feed}/properties"] = {"status": "ok", "count": 2, "data": [
        {"technical_name": "destination_uri", "property_type": "STRING",
         "value": {"value": (tmp_path / "o").as_uri()}},
        {"technical_name": "file_fromat", "property_type": "STRING", "value": {"value": "parquet"}}]}
    try:
        srv = filefeed_factory(env={"PLUGIN_WORKER_ID": "Calavera", "PLUGIN_AUTHENTICATION_TOKEN": "Manny",
                                    "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(gw.port)})
        body = srv.post("/v1/external_segment_creation", {"feed_id": "42", "datamart_id": "1",
                                                          "segment_id": "7"}).json()
        assert body["status"] == "ok", body
        assert "file_fromat: unknown property (did you mean file_format?)" in body["message"]
        data = srv.post("/v1/troubleshoot", {"feed_id": "42", "datamart_id": "1",
                                             "action": "FETCH_DESTINATION_AUDIENCE"}).json()["data"]
        assert data["configuration_warnings"] == ["file_fromat: unknown property (did you mean file_format?)"]
        assert any("did you mean file_format?" in line and '"warn"' in line for line in srv.log_text().splitlines())
    finally:
        gw.close()


def test_sftp_known_hosts_from_the_config_file(tmp_path: Path, filefeed_factory, servers) -> None:
    """settings.sftp_known_hosts is what the SFTP sink uses, wherever it was set (here: the FILEFEED_CONFIG file)."""
    from tests.servers import sink_props

    props = sink_props("sftp", servers, "known-hosts-setting", sftp_host_key=None)
    feed = {k: (v.get_secret_value() if hasattr(v, "get_secret_value") else v) for k, v in props.model_dump().items()
            if v is not None}
    (tmp_path / "settings.toml").write_text(f'FILEFEED_SFTP_KNOWN_HOSTS = "{servers["SFTP_KNOWN_HOSTS"]}"\n')
    srv = filefeed_factory(feeds={"42": feed}, env={"FILEFEED_CONFIG": str(tmp_path / "settings.toml")})
    body = srv.post("/v1/external_segment_creation", {"feed_id": "42", "datamart_id": "1", "segment_id": "7"}).json()
    assert body["status"] == "ok", body


def test_inspect_paths_relative_to_the_staging_folder(tmp_path: Path, filefeed_factory) -> None:
    from tests.ops.helpers import FEED, SEGMENT, cli, send_users

    srv = filefeed_factory(feeds={FEED: {"destination_uri": (tmp_path / "out").as_uri()}})
    send_users(srv, range(3))
    srv.stop()  # the open segment is sealed at shutdown
    seg = next((srv.staging / "feeds" / FEED / SEGMENT / "UPSERT").rglob("*.jnl"))
    rel = str(seg.relative_to(srv.staging))  # feeds/42/451256/UPSERT/sealed/<seg>.jnl, as the README writes it
    p = cli(srv.env, "inspect", rel, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout == cli(srv.env, "inspect", str(seg), "--json").stdout and p.stdout.count("\n") >= 3
    missing = cli(srv.env, "inspect", "feeds/42/nothing.jnl")
    assert_plain(missing, 2, "no such file: feeds/42/nothing.jnl", "FILEFEED_STAGING_DIR")
