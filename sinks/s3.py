"""`s3://bucket/prefix`: publish to S3 or an S3-compatible store (SeaweedFS, MinIO, ...) with boto3.

- Small files (below `transfer_config.multipart_threshold`) go in one PutObject; larger ones in a multipart upload
  whose parts (`multipart_chunksize`, 16 MiB) are sent `max_concurrency` at a time. The multipart loop is ours rather
  than s3transfer's because s3transfer (0.17) cannot send `If-None-Match` on CompleteMultipartUpload; it follows the
  same TransferConfig knobs.
- Create-only: PutObject and CompleteMultipartUpload carry `If-None-Match: *`. A 412 means the name exists: same size
  and bytes -> `already_present`; otherwise TerminalError(kind="conflict"). A HEAD before uploading makes an idempotent
  re-publish cheap. Stores that ignore the header (older MinIO, moto) make the HEAD the only guard.
- Nothing half-visible: an object appears only when PutObject/Complete succeeds. On any failure the multipart upload
  is aborted so no parts remain billed; if the abort itself cannot reach the server (server gone) the upload id is in
  the error message. Buckets should still carry an AbortIncompleteMultipartUpload lifecycle rule for process crashes.
- Errors are classified here once: throttling/5xx/connection/timeouts -> TransientError; credentials, permissions,
  missing bucket, conflicts -> TerminalError. Messages carry the error code, never a key or a signature.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from sinks import register
from sinks.base import (
    Leftover,
    RemoteObject,
    Sink,
    SinkError,
    TerminalError,
    TransientError,
    classify_os_error,
    same_bytes,
)
from sinks.retry import with_retries

log = logging.getLogger(__name__)

MiB = 1 << 20

AUTH_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AuthorizationHeaderMalformed", "InvalidSecurity", "MissingSecurityHeader", "InvalidClientTokenId",
    "UnrecognizedClientException", "AuthFailure",
}
PERMISSION_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "KMS.AccessDeniedException"}
NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "NotFound", "404"}
THROTTLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestThrottled", "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
}
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "RequestTimeout", "NoSuchUpload", "OperationAborted"}
PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}


def classify(e: BaseException, what: str) -> SinkError:
    """One place that turns boto3/botocore exceptions into TransientError / TerminalError."""
    if isinstance(e, SinkError):
        return e
    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", "")) or "Unknown"
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = f"{what}: {code} (HTTP {status})"
        if code in AUTH_CODES or status == 401:
            return TerminalError(msg + ": check aws_access_key_id / aws_secret_access_key", kind="auth")
        if code in PERMISSION_CODES or status == 403:
            return TerminalError(msg + ": the credentials lack permission", kind="permission")
        if code in ("NoSuchBucket",):
            return TerminalError(msg + ": the bucket does not exist", kind="not_found")
        if code in NOT_FOUND_CODES or status == 404:
            return TerminalError(msg, kind="not_found")
        if code in PRECONDITION_CODES or status == 412:
            return TerminalError(msg + ": the name exists", kind="conflict")
        if code in THROTTLE_CODES or status == 429:
            return TransientError(msg, kind="throttled")
        if code in TRANSIENT_CODES or status >= 500:
            return TransientError(msg, kind="server")
        if code == "RequestTimeTooSkewed":
            return TerminalError(msg + ": the local clock is wrong", kind="config")
        if code.startswith("KMS") or code in ("InvalidArgument", "InvalidRequest", "InvalidEncryptionAlgorithmError"):
            return TerminalError(msg, kind="config")
        return TerminalError(msg, kind="rejected")
    if isinstance(e, (ReadTimeoutError, ConnectTimeoutError)):
        return TransientError(f"{what}: timed out ({type(e).__name__})", kind="timeout")
    if isinstance(e, (EndpointConnectionError, ConnectionClosedError, BotoConnectionError, HTTPClientError)):
        return TransientError(f"{what}: connection failed ({type(e).__name__})", kind="network")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return TerminalError(f"{what}: no usable AWS credentials ({type(e).__name__})", kind="auth")
    if isinstance(e, ParamValidationError):
        return TerminalError(f"{what}: invalid request parameters", kind="config")
    if isinstance(e, BotoCoreError):
        return TerminalError(f"{what}: {type(e).__name__}", kind="client")
    if isinstance(e, OSError):
        return classify_os_error(e, what)
    return TerminalError(f"{what}: unexpected {type(e).__name__}", kind="client")


def _is_precondition_failure(e: BaseException) -> bool:
    if not isinstance(e, ClientError):
        return False
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code in PRECONDITION_CODES or status == 412


@register
class S3Sink(Sink):
    scheme = "s3"
    shareable = True  # a boto3 client is thread-safe; building one takes 0.1-0.8 s of CPU

    # Tunables, overridable per instance before first use (tests shorten the timeouts).
    transfer_config = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=6)
    max_attempts: int = 3  # botocore "standard" retries per request; publish-level retries belong to the caller
    abort_attempts: int = 8
    abort_seconds: float = 30.0

    _client: Any = None

    # -- plumbing ----------------------------------------------------------------------------------------------
    @property
    def bucket(self) -> str:
        return self.destination.host

    _client_lock = threading.Lock()  # one client built at a time (class-wide: building is CPU, not waiting)

    @property
    def client(self) -> Any:
        if self._client is not None:
            return self._client
        if not self._client_lock.acquire(timeout=60):
            raise TransientError(f"creating the S3 client for {self.destination.uri}: timed out", kind="busy")
        try:
            return self._build_client()
        finally:
            self._client_lock.release()

    def _build_client(self) -> Any:
        if self._client is None:
            p = self.props
            endpoint = p.s3_endpoint_url
            config = Config(
                # custom endpoints (SeaweedFS, MinIO) rarely have wildcard DNS for virtual-hosted buckets
                s3={"addressing_style": "path" if endpoint else "auto"},
                retries={"mode": "standard", "max_attempts": self.max_attempts},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                # several rolls share one client (SinkPool), each sending up to max_concurrency parts at once
                max_pool_connections=4 * self.transfer_config.max_request_concurrency + 4,
            )
            kwargs: dict[str, Any] = {
                "endpoint_url": endpoint,
                "region_name": p.s3_region or ("us-east-1" if endpoint else None),
                "config": config,
            }
            if p.aws_access_key_id and p.aws_secret_access_key:
                kwargs["aws_access_key_id"] = p.aws_access_key_id
                kwargs["aws_secret_access_key"] = p.aws_secret_access_key.get_secret_value()
            # otherwise boto3's default chain: env, profile, container/instance role
            try:
                self._client = boto3.session.Session().client("s3", **kwargs)
            except Exception as e:
                raise classify(e, f"creating the S3 client for {self.destination.uri}") from None
        return self._client

    def _sse_args(self) -> dict[str, str]:
        p = self.props
        args: dict[str, str] = {}
        if p.s3_sse:
            args["ServerSideEncryption"] = p.s3_sse
            if p.s3_sse == "aws:kms" and p.s3_kms_key_id:
                args["SSEKMSKeyId"] = p.s3_kms_key_id
        return args

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- publish: the hooks of Sink.publish ----------------------------------------------------------------------
    def _lookup(self, name: str) -> dict | None:
        return self._head(self.key(name), self.url(name))

    def _size_of(self, found: dict) -> int:
        return int(found.get("ContentLength", -1))

    def _classify(self, e: BaseException, what: str) -> SinkError:
        return classify(e, what)

    def _create(self, local_path: Path, name: str, size: int) -> bool:
        key = self.key(name)
        try:
            if size < self.transfer_config.multipart_threshold:
                self._put(local_path, key, size)
            else:
                self._multipart(local_path, key, size, self.url(name))
        except Exception as e:
            if _is_precondition_failure(e):  # created meanwhile by someone else
                return False
            raise
        return True

    def _put(self, local_path: Path, key: str, size: int) -> None:
        with self.open_source(local_path) as body:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentLength=size, IfNoneMatch="*", **self._sse_args()
            )

    def _multipart(self, local_path: Path, key: str, size: int, url: str) -> None:
        tc = self.transfer_config
        part_size = max(5 * MiB, tc.multipart_chunksize)
        while -(-size // part_size) > 10_000:  # S3's part count limit
            part_size *= 2
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, **self._sse_args())["UploadId"]
        try:
            parts = self._upload_parts(local_path, key, upload_id, part_size, max(1, tc.max_request_concurrency))
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            )
        except BaseException as e:
            self._abort(key, upload_id, url, e)
            raise

    def _upload_parts(self, local_path: Path, key: str, upload_id: str, part_size: int, threads: int) -> list[dict]:
        """Read parts sequentially (one reader, bounded memory: `threads` parts in flight) and send them in parallel."""
        slots = threading.BoundedSemaphore(threads)
        futures: list[Future] = []
        failed = threading.Event()

        def send(number: int, data: bytes) -> dict:
            try:
                if failed.is_set():
                    raise TransientError("upload cancelled after another part failed", kind="cancelled")
                r = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                return {"PartNumber": number, "ETag": r["ETag"]}
            except BaseException:
                failed.set()
                raise
            finally:
                slots.release()

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3-part") as pool:
            try:
                with self.open_source(local_path) as src:
                    number = 0
                    while not failed.is_set():
                        data = src.read(part_size)
                        if not data:
                            break
                        number += 1
                        slots.acquire()
                        futures.append(pool.submit(send, number, data))
                        del data
            except BaseException:
                failed.set()
                for f in futures:
                    f.cancel()
                raise
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                f.cancel()
        # re-raise the root cause: a real part failure, not the parts skipped or cancelled because of it
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        real = [e for e in errors if not (isinstance(e, TransientError) and e.kind == "cancelled")]
        if real or errors:
            raise (real or errors)[0]
        return [f.result() for f in futures]

    def _abort(self, key: str, upload_id: str, url: str, cause: BaseException) -> None:
        """Abort so no parts stay stored; retried for a while, since the failure that got us here may be brief."""

        def abort() -> None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) == "NoSuchUpload":
                    return  # already gone
                raise classify(e, f"aborting the upload of {url}") from None
            except Exception as e:
                raise classify(e, f"aborting the upload of {url}") from None

        try:
            with_retries(abort, attempts=self.abort_attempts, max_seconds=self.abort_seconds, base_delay=0.5)
        except SinkError as e:
            log.warning("abort of multipart upload %s for %s failed (%s) after %s; parts remain until a lifecycle "
                        "rule removes them", upload_id, url, type(e).__name__, type(cause).__name__)

    def _head(self, key: str, url: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            code = str(e.response.get("Error", {}).get("Code", ""))
            if status == 404 and code != "NoSuchBucket":
                return None
            if status == 403:
                # a HEAD answer has no body, so no error code: bad signature and missing permission look alike.
                # A one-byte GET of the same key returns the code (InvalidAccessKeyId, AccessDenied, ...).
                try:
                    self.client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
                except Exception as e2:
                    raise classify(e2, f"checking {url}") from None
            raise classify(e, f"checking {url}") from None
        except Exception as e:
            raise classify(e, f"checking {url}") from None

    def _same_content(self, local_path: Path, name: str, head: dict) -> bool:
        key = self.key(name)
        etag = str(head.get("ETag", "")).strip('"')
        # a single-part, non-KMS ETag is the MD5 of the bytes: no need to download
        if etag and "-" not in etag and head.get("ServerSideEncryption") != "aws:kms" and len(etag) == 32:
            md5 = hashlib.md5(usedforsecurity=False)
            with open(local_path, "rb") as f:
                while chunk := f.read(MiB):
                    md5.update(chunk)
            return md5.hexdigest() == etag
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            return same_bytes(local_path, body.iter_chunks(MiB))
        except Exception as e:
            raise classify(e, f"comparing s3://{self.bucket}/{key}") from None

    # -- the rest of the contract ------------------------------------------------------------------------------
    def check(self) -> None:
        probe = self.key(f".filefeed-probe-{uuid.uuid4().hex}")
        try:
            # HEAD first: some stores (SeaweedFS with an admin identity) create a missing bucket on PutObject
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) == 404:
                raise TerminalError(f"checking {self.destination.uri}: bucket '{self.bucket}' does not exist",
                                    kind="not_found") from None
            # other HEAD errors carry no code (no body): let the PUT below say what is wrong
        except Exception as e:
            raise classify(e, f"checking {self.destination.uri}") from None
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"filefeed probe\n", **self._sse_args())
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as e:
            raise classify(e, f"checking {self.destination.uri}") from None

    def stat(self, name: str) -> RemoteObject | None:
        head = self._head(self.key(name), self.url(name))
        return None if head is None else RemoteObject(name, int(head["ContentLength"]))

    def list(self, prefix: str = "") -> Iterator[RemoteObject]:
        base = self.destination.path.strip("/")
        base = f"{base}/" if base else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
            for page in pages:
                for obj in page.get("Contents", []) or []:
                    yield RemoteObject(obj["Key"][len(base):], int(obj["Size"]))
        except Exception as e:
            raise classify(e, f"listing {self.destination.uri}") from None

    def leftovers(self, prefixes: Iterable[str], older_than: float,
                  own: Callable[[str], bool]) -> Iterator[Leftover]:
        """Incomplete multipart uploads to keys this feed renders (a process killed mid-upload leaves them)."""
        base = self.destination.path.strip("/")
        base = f"{base}/" if base else ""
        now = datetime.now(UTC)
        try:
            for prefix in prefixes:
                pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                       Prefix=base + prefix)
                for page in pages:
                    for up in page.get("Uploads", []) or []:
                        rel = up["Key"][len(base):]
                        age = (now - up["Initiated"]).total_seconds()
                        if up["Key"].startswith(base) and age > older_than and own(rel):
                            yield Leftover(f"{rel} (incomplete multipart upload {up['UploadId']})", age,
                                           (up["Key"], up["UploadId"]))
        except Exception as e:
            raise classify(e, f"listing the multipart uploads of {self.destination.uri}") from None

    def remove_leftover(self, leftover: Leftover) -> None:
        key, upload_id = leftover.handle
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) != "NoSuchUpload":
                raise classify(e, f"aborting {leftover.name}") from None
        except Exception as e:
            raise classify(e, f"aborting {leftover.name}") from None

    def read(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
        except Exception as e:
            raise classify(e, f"reading {self.url(name)}") from None

    def remove(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as e:
            raise classify(e, f"removing {self.url(name)}") from None
