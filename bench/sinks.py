"""Sink throughput against the raw client, on the real test servers, same file, same command.

    python bench/sinks.py --mb 256 [--schemes file,s3,sftp,gs] [--repeat 1]

For each backend: publish through the sink, then upload the same file with the plain client (boto3 upload_file,
paramiko put, google-cloud-storage upload_from_filename, shutil.copy), print MB/s for both and sink/raw (target
>= 0.80). Connections are opened before timing on both sides. The servers come from $FILEFEED_SERVERS_ENV or
.servers/env (scripts/servers.sh start), or are started for the run and stopped after it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sinks import Sink, open_sink  # noqa: E402
from tests.servers import read_env, servers_alive, sink_props, start_servers, stop_servers  # noqa: E402

MB = 1_000_000


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def raw_upload(scheme: str, servers: dict[str, str], src: Path, prefix: str) -> tuple[Callable[[], object],
                                                                                       Callable[[], None]]:
    """(upload, cleanup) for the plain client, connected already."""
    key = f"{prefix}/raw.bin"
    if scheme == "file":
        dest = Path(servers["FILE_ROOT"]) / prefix
        dest.mkdir(parents=True, exist_ok=True)
        return (lambda: shutil.copy(src, dest / "raw.bin")), (lambda: shutil.rmtree(dest, ignore_errors=True))
    if scheme == "s3":
        import boto3
        from botocore.config import Config

        c = boto3.client("s3", endpoint_url=servers["S3_ENDPOINT"], region_name="us-east-1",
                         aws_access_key_id=servers["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=servers["AWS_SECRET_ACCESS_KEY"],
                         config=Config(s3={"addressing_style": "path"}))
        c.head_bucket(Bucket=servers["S3_BUCKET"])
        return ((lambda: c.upload_file(str(src), servers["S3_BUCKET"], key)),
                (lambda: c.delete_object(Bucket=servers["S3_BUCKET"], Key=key) and None))
    if scheme == "sftp":
        import paramiko

        client = paramiko.SSHClient()
        client.load_host_keys(servers["SFTP_KNOWN_HOSTS"])
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(servers["SFTP_HOST"], int(servers["SFTP_PORT"]), servers["SFTP_USER"],
                       key_filename=servers["SFTP_KEY"], look_for_keys=False, allow_agent=False)
        sftp = client.open_sftp()
        remote = f"{servers['SFTP_ROOT']}/{prefix}-raw.bin"

        def cleanup() -> None:
            sftp.remove(remote)
            client.close()

        return (lambda: sftp.put(str(src), remote)), cleanup
    if scheme == "gs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        c = storage.Client(project="filefeed-test", credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": servers["GCS_ENDPOINT"]})
        blob = c.bucket(servers["GCS_BUCKET"]).blob(key)
        return (lambda: blob.upload_from_filename(str(src))), (lambda: blob.delete())
    raise ValueError(scheme)


def clean(sink: Sink) -> None:
    for o in list(sink.list()):
        sink.remove(o.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="file size in MB (10^6 bytes)")
    ap.add_argument("--schemes", default="file,s3,sftp,gs")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side; the best is reported")
    args = ap.parse_args()

    started: Path | None = None
    env_path = Path(os.environ.get("FILEFEED_SERVERS_ENV", REPO / ".servers" / "env"))
    if env_path.is_file() and servers_alive(env_path.parent):
        servers = read_env(env_path)
    else:
        started = Path(tempfile.mkdtemp(prefix="filefeed-bench-servers-"))
        print(f"starting servers in {started} ...", flush=True)
        servers = start_servers(started)
    work = Path(tempfile.mkdtemp(prefix="filefeed-bench-"))
    servers["FILE_ROOT"] = str(work / "dest")
    try:
        src = work / "payload.bin"
        size = args.mb * MB
        with open(src, "wb") as f:  # incompressible, so no layer can cheat with compression
            block = os.urandom(MB)
            for i in range(args.mb):
                f.write(i.to_bytes(8, "little") + block[8:])
        print(f"payload: {size / MB:.0f} MB, repeat {args.repeat}")
        print(f"{'backend':8} {'sink MB/s':>10} {'raw MB/s':>10} {'sink/raw':>9}")
        worst = 1e9
        for scheme in args.schemes.split(","):
            prefix = f"bench-{uuid.uuid4().hex[:8]}"
            sink_s, raw_s = [], []
            # One untimed upload first: a fresh server (fake-gcs-server most of all) gets faster over its first
            # uploads, so whichever side ran first used to lose. Then the order alternates per repeat.
            warm, warm_cleanup = raw_upload(scheme, servers, src, f"{prefix}-warm")
            warm()
            warm_cleanup()
            for r in range(args.repeat):
                for side in (("sink", "raw") if r % 2 == 0 else ("raw", "sink")):
                    if side == "sink":
                        with open_sink(sink_props(scheme, servers, f"{prefix}/sink{r}")) as sink:
                            sink.check()  # connects (and proves credentials) outside the timed part
                            if scheme == "file":
                                # Same filesystem here: the sink would hard-link (no bytes moved). Measure the
                                # copy a destination on another mount gets.
                                sink.link_sources = False  # type: ignore[attr-defined]
                            sink_s.append(timed(lambda: sink.publish(src, "payload.bin")))  # noqa: B023
                            clean(sink)
                    else:
                        upload, cleanup = raw_upload(scheme, servers, src, f"{prefix}-raw{r}")
                        raw_s.append(timed(upload))
                        cleanup()
            sink_rate, raw_rate = size / MB / min(sink_s), size / MB / min(raw_s)
            if scheme != "file":  # the local sink is judged against copy + fsync below
                worst = min(worst, sink_rate / raw_rate)
            print(f"{scheme:8} {sink_rate:10.1f} {raw_rate:10.1f} {sink_rate / raw_rate:9.2f}", flush=True)
            if scheme == "file":  # the sink fsyncs (file and folder); shutil.copy does not: show the fair baseline
                dest = work / "fsync-baseline.bin"

                def copy_fsync(dest: Path = dest) -> None:
                    shutil.copy(src, dest)
                    fd = os.open(dest, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)

                t = min(timed(copy_fsync) for _ in range(args.repeat))
                dest.unlink()
                worst = min(worst, sink_rate / (size / MB / t))
                print(f"{'  +fsync':8} {'':10} {size / MB / t:10.1f} {sink_rate / (size / MB / t):9.2f}"
                      "   (raw = shutil.copy + fsync)", flush=True)
        print(f"worst ratio {worst:.2f} (target >= 0.80)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started is not None:
            stop_servers(started)
            shutil.rmtree(started, ignore_errors=True)  # weed keeps every uploaded byte: hundreds of MB
    return 0


if __name__ == "__main__":
    sys.exit(main())
