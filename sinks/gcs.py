"""`gs://bucket/prefix`: publish to Google Cloud Storage (or fake-gcs-server) with google-cloud-storage.

- Credentials: `gcs_endpoint_url` set -> that endpoint with anonymous credentials (emulators); otherwise the
  `gcs_service_account_json` (service_account.Credentials.from_service_account_info) or Application Default
  Credentials. A service-account JSON that cannot be parsed is refused (kind "auth") even with an emulator endpoint.
- Small files (<= 8 MiB, the library's multipart limit) go in one request; larger ones in a resumable upload with
  100 MiB chunks (`chunk_size`). Both carry `ifGenerationMatch=0`: create-only, and a 412 leads to comparing the
  existing object (same size and MD5 -> `already_present`, else TerminalError kind "conflict").
- Nothing half-visible: an object exists only once its upload completes; an abandoned resumable session holds no
  object (GCS expires it after a week).
- fake-gcs-server (1.54) enforces `ifGenerationMatch=0` on single-request uploads but NOT on resumable ones. The
  sink therefore also looks the name up before uploading, which makes an idempotent re-publish cheap everywhere and
  keeps create-only on the emulator except against a concurrent publisher of the same name (real GCS enforces it).
- Errors are classified here once: 429/408/5xx/connection/timeouts -> TransientError; 401/403/404, bad credentials,
  conflicts -> TerminalError. Messages carry the HTTP status, never a credential.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.auth.exceptions as gauth_exc
import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from sinks import register
from sinks.base import (
    RemoteObject,
    Sink,
    SinkError,
    TerminalError,
    TransientError,
    classify_os_error,
    same_bytes,
)

MiB = 1 << 20
SIMPLE_UPLOAD_MAX = 8 * MiB  # google-cloud-storage's own switch-over point to resumable uploads


def _status_error(status: int, what: str) -> SinkError:
    msg = f"{what}: HTTP {status}"
    if status == 401:
        return TerminalError(msg + ": credentials refused (gcs_service_account_json)", kind="auth")
    if status == 403:
        return TerminalError(msg + ": the credentials lack permission", kind="permission")
    if status == 404:
        return TerminalError(msg + ": bucket or object not found", kind="not_found")
    if status == 412:
        return TerminalError(msg + ": the name exists", kind="conflict")
    if status in (408, 429):
        return TransientError(msg, kind="throttled" if status == 429 else "timeout")
    if status >= 500:
        return TransientError(msg, kind="server")
    return TerminalError(msg, kind="rejected")


def classify(e: BaseException, what: str) -> SinkError:
    """One place that turns google-cloud-storage / google-auth / requests errors into Transient / Terminal."""
    if isinstance(e, SinkError):
        return e
    if isinstance(e, gexc.RetryError):
        cause = e.cause
        if cause is not None and cause is not e:
            inner = classify(cause, what)
            return TransientError(f"{inner} (retries exhausted)", kind=inner.kind) if inner.transient else inner
        return TransientError(f"{what}: retries exhausted", kind="timeout")
    if isinstance(e, gexc.GoogleAPICallError):
        status = int(e.code or 0)
        if status:
            return _status_error(status, what)
        return TransientError(f"{what}: {type(e).__name__}", kind="server")
    if isinstance(e, InvalidResponse):
        return _status_error(int(getattr(e.response, "status_code", 0) or 0), what)
    if isinstance(e, DataCorruption):
        return TransientError(f"{what}: checksum mismatch after upload", kind="corrupt")
    if isinstance(e, (requests.Timeout, gauth_exc.TimeoutError)):
        return TransientError(f"{what}: timed out ({type(e).__name__})", kind="timeout")
    if isinstance(e, (requests.ConnectionError, gauth_exc.TransportError)):
        return TransientError(f"{what}: connection failed ({type(e).__name__})", kind="network")
    if isinstance(e, (gauth_exc.DefaultCredentialsError, gauth_exc.RefreshError, gauth_exc.MalformedError)):
        return TerminalError(f"{what}: unusable Google credentials ({type(e).__name__})", kind="auth")
    if isinstance(e, requests.RequestException):
        return TransientError(f"{what}: HTTP failure ({type(e).__name__})", kind="network")
    if isinstance(e, OSError):
        return classify_os_error(e, what)
    return TerminalError(f"{what}: unexpected {type(e).__name__}", kind="client")


@register
class GCSSink(Sink):
    scheme = "gs"

    # Tunables, overridable per instance before first use.
    # The library's own default for resumable uploads: each chunk is one request, and the emulator (like GCS) pays a
    # round trip and a commit per request; 32 MiB chunks ran at 0.43 of `upload_from_filename` here, 100 MiB at par.
    # Costs up to 100 MiB of memory during an upload.
    chunk_size: int = 100 * MiB
    retry_deadline: float = 30.0  # library-level retries per request; 0 disables (publish retries are the caller's)

    _client: Any = None
    _bucket: Any = None

    def __init__(self, props: Any):
        super().__init__(props)
        self.timeout: float | tuple[float, float] = (self.connect_timeout, self.read_timeout)  # per HTTP request

    @property
    def client(self) -> Any:
        if self._client is None:
            p = self.props
            creds: Any = None
            project = p.gcs_project
            if p.gcs_service_account_json is not None:
                from google.oauth2 import service_account

                try:
                    info = json.loads(p.gcs_service_account_json.get_secret_value())
                    sa_creds = service_account.Credentials.from_service_account_info(info)
                except (ValueError, KeyError, TypeError, gauth_exc.GoogleAuthError) as e:
                    # the message names the problem's type, never the JSON
                    raise TerminalError(
                        f"gcs_service_account_json is not a usable service account key ({type(e).__name__})",
                        kind="auth",
                    ) from None
                project = project or info.get("project_id")
                creds = sa_creds
            try:
                if p.gcs_endpoint_url:
                    self._client = storage.Client(
                        project=project or "filefeed",
                        credentials=AnonymousCredentials(),
                        client_options={"api_endpoint": p.gcs_endpoint_url},
                    )
                else:
                    self._client = storage.Client(project=project, credentials=creds)
            except Exception as e:
                raise classify(e, f"creating the GCS client for {self.destination.uri}") from None
        return self._client

    @property
    def bucket(self) -> Any:
        if self._bucket is None:
            self._bucket = self.client.bucket(self.destination.host)
        return self._bucket

    def _retry(self) -> Retry | None:
        return DEFAULT_RETRY.with_timeout(self.retry_deadline) if self.retry_deadline > 0 else None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
        self._client = self._bucket = None

    # -- publish: the hooks of Sink.publish ----------------------------------------------------------------------
    def _lookup(self, name: str) -> Any:
        return self._get(self.key(name), self.url(name))

    def _size_of(self, found: Any) -> int:
        return -1 if found.size is None else int(found.size)

    def _classify(self, e: BaseException, what: str) -> SinkError:
        return classify(e, what)

    def _create(self, local_path: Path, name: str, size: int) -> bool:
        blob = self.bucket.blob(self.key(name), chunk_size=self.chunk_size if size > SIMPLE_UPLOAD_MAX else None)
        try:
            with self.open_source(local_path) as src:
                blob.upload_from_file(
                    src, size=size, if_generation_match=0, timeout=self.timeout, retry=self._retry(),
                    content_type="application/octet-stream",
                )
        except Exception as e:
            err = classify(e, f"publishing {self.url(name)}")
            if err.kind == "conflict":  # 412: created meanwhile
                return False
            raise err from None
        return True

    def _get(self, key: str, url: str) -> Any:
        try:
            return self.bucket.get_blob(key, timeout=self.timeout, retry=self._retry())
        except Exception as e:
            raise classify(e, f"checking {url}") from None

    def _same_content(self, local_path: Path, name: str, blob: Any) -> bool:
        url = self.url(name)
        if blob.md5_hash:  # absent on composite objects
            md5 = hashlib.md5(usedforsecurity=False)
            with open(local_path, "rb") as f:
                while chunk := f.read(MiB):
                    md5.update(chunk)
            return base64.b64encode(md5.digest()).decode() == blob.md5_hash
        try:
            with blob.open("rb", chunk_size=8 * MiB) as f:
                return same_bytes(local_path, iter(lambda: f.read(MiB), b""))
        except Exception as e:
            raise classify(e, f"comparing {url}") from None

    # -- the rest of the contract ------------------------------------------------------------------------------
    def check(self) -> None:
        probe = self.bucket.blob(self.key(f".filefeed-probe-{uuid.uuid4().hex}"))
        try:
            probe.upload_from_string(b"filefeed probe\n", if_generation_match=0, timeout=self.timeout,
                                     retry=self._retry())
            probe.delete(timeout=self.timeout, retry=self._retry())
        except Exception as e:
            raise classify(e, f"checking {self.destination.uri}") from None

    def stat(self, name: str) -> RemoteObject | None:
        blob = self._get(self.key(name), self.url(name))
        return None if blob is None else RemoteObject(name, int(blob.size))

    def list(self, prefix: str = "") -> Iterator[RemoteObject]:
        base = self.destination.path.strip("/")
        base = f"{base}/" if base else ""
        try:
            for blob in self.client.list_blobs(self.bucket, prefix=base + prefix, timeout=self.timeout,
                                               retry=self._retry()):
                yield RemoteObject(blob.name[len(base):], int(blob.size))
        except Exception as e:
            raise classify(e, f"listing {self.destination.uri}") from None

    def read(self, name: str) -> bytes:
        try:
            return self.bucket.blob(self.key(name)).download_as_bytes(timeout=self.timeout, retry=self._retry())
        except Exception as e:
            raise classify(e, f"reading {self.url(name)}") from None

    def remove(self, name: str) -> None:
        try:
            self.bucket.blob(self.key(name)).delete(timeout=self.timeout, retry=self._retry())
        except gexc.NotFound:
            return
        except Exception as e:
            raise classify(e, f"removing {self.url(name)}") from None
