"""Error classification at each sink's edge, without servers (Stubber / constructed exceptions only).

The contract suite proves the sinks on real servers; these tests pin down the mapping of every error family to
TransientError / TerminalError and its `kind`, and that no message carries a secret.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import paramiko
import pytest
import requests
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.stub import Stubber
from google.api_core import exceptions as gexc
from google.auth import exceptions as gauth_exc

import sinks
from config.feed import FeedProperties
from sinks import SinkError, TerminalError, TransientError, gcs, open_sink, s3, sftp
from sinks.base import classify_os_error
from sinks.retry import with_retries

SECRET = "s3cr3t-VALUE-never-shown"


def client_error(code: str, status: int, message: str = "boom") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def assert_kind(err: SinkError, transient: bool, kind: str) -> None:
    assert isinstance(err, TransientError if transient else TerminalError), err
    assert err.transient is transient
    assert err.kind == kind


# -- S3 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "status", "transient", "kind"),
    [
        ("InvalidAccessKeyId", 403, False, "auth"),
        ("SignatureDoesNotMatch", 403, False, "auth"),
        ("ExpiredToken", 400, False, "auth"),
        ("AccessDenied", 403, False, "permission"),
        ("403", 403, False, "permission"),
        ("NoSuchBucket", 404, False, "not_found"),
        ("PreconditionFailed", 412, False, "conflict"),
        ("SlowDown", 503, True, "throttled"),
        ("TooManyRequests", 429, True, "throttled"),
        ("InternalError", 500, True, "server"),
        ("ServiceUnavailable", 503, True, "server"),
        ("BadGateway", 502, True, "server"),
        ("RequestTimeout", 400, True, "server"),
        ("KMS.NotFoundException", 400, False, "config"),
        ("EntityTooLarge", 400, False, "rejected"),
    ],
)
def test_s3_client_errors(code: str, status: int, transient: bool, kind: str) -> None:
    err = s3.classify(client_error(code, status, message=f"details {SECRET}"), "publishing s3://b/k")
    assert_kind(err, transient, kind)
    assert code in str(err) and SECRET not in str(err)


@pytest.mark.parametrize(
    ("exc", "transient", "kind"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True, "network"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True, "timeout"),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), True, "timeout"),
        (NoCredentialsError(), False, "auth"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True, "network"),
    ],
)
def test_s3_transport_errors(exc: Exception, transient: bool, kind: str) -> None:
    assert_kind(s3.classify(exc, "x"), transient, kind)


def s3_sink(tmp_path: Path) -> s3.S3Sink:
    props = FeedProperties(destination_uri="s3://bucket/prefix", s3_endpoint_url="http://127.0.0.1:9",
                           aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key=SECRET)
    sink = open_sink(props)
    assert isinstance(sink, s3.S3Sink)
    return sink


def test_s3_publish_throttled_is_transient_and_multipart_is_aborted(tmp_path: Path) -> None:
    sink = s3_sink(tmp_path)
    sink.transfer_config = s3.TransferConfig(multipart_threshold=5 * s3.MiB, multipart_chunksize=5 * s3.MiB,
                                             max_concurrency=1)
    src = tmp_path / "f"
    src.write_bytes(b"x" * (6 * s3.MiB))
    with Stubber(sink.client) as stub:
        stub.add_client_error("head_object", "404", http_status_code=404)
        stub.add_response("create_multipart_upload", {"UploadId": "u1", "Bucket": "bucket", "Key": "prefix/a.bin"})
        stub.add_client_error("upload_part", "SlowDown", http_status_code=503)
        stub.add_response("abort_multipart_upload", {},
                          {"Bucket": "bucket", "Key": "prefix/a.bin", "UploadId": "u1"})
        with pytest.raises(TransientError) as e:
            sink.publish(src, "a.bin")
        stub.assert_no_pending_responses()  # the abort was sent
    assert e.value.kind == "throttled" and SECRET not in str(e.value)


def test_s3_412_on_put_with_identical_object_is_already_present(tmp_path: Path) -> None:
    sink = s3_sink(tmp_path)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    with Stubber(sink.client) as stub:
        stub.add_client_error("head_object", "404", http_status_code=404)
        stub.add_client_error("put_object", "PreconditionFailed", http_status_code=412)
        # md5("abc"): the single-part ETag lets the sink compare without downloading
        stub.add_response("head_object", {"ContentLength": 3, "ETag": '"900150983cd24fb0d6963f7d28e17f72"'})
        r = sink.publish(src, "a.csv")
    assert r.already_present


# -- SFTP ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "transient", "kind"),
    [
        (paramiko.AuthenticationException("no"), False, "auth"),
        (paramiko.BadAuthenticationType("no", ["password"]), False, "auth"),
        (TimeoutError("timed out"), True, "timeout"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True, "network"),
        (EOFError(), True, "network"),
        (paramiko.SSHException("Error reading SSH protocol banner"), True, "network"),
        (OSError("Socket is closed"), True, "network"),
        (OSError(errno.ENOENT, "No such file"), False, "not_found"),
        (OSError(errno.EACCES, "Permission denied"), False, "permission"),
        (OSError("Failure"), True, "remote_io"),
        (OSError("Operation unsupported"), False, "unsupported"),
    ],
)
def test_sftp_errors(exc: BaseException, transient: bool, kind: str) -> None:
    assert_kind(sftp.classify(exc, "x"), transient, kind)


def test_sftp_bad_host_key_exception_is_terminal() -> None:
    err = sftp.classify(paramiko.BadHostKeyException("h", _Key("a"), _Key("b")), "x")
    assert_kind(err, False, "host_key")


class _Key:
    def __init__(self, b: str):
        self._b = b

    def get_base64(self) -> str:
        return self._b

    def get_name(self) -> str:
        return "ssh-ed25519"


def test_host_key_pins_parse() -> None:
    keys, prints = sftp.parse_host_key_pins(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@h\n"
        "[127.0.0.1]:2222 ecdsa-sha2-nistp256 AAAAE2VjZHNh\n"
        "SHA256:abcDEF123=\n# comment\n"
    )
    assert set(keys) == {"ssh-ed25519", "ecdsa-sha2-nistp256"}
    assert prints == {"SHA256:abcDEF123"}
    with pytest.raises(TerminalError) as e:
        sftp.parse_host_key_pins("not a key")
    assert e.value.kind == "config"
    with pytest.raises(TerminalError):
        sftp.parse_host_key_pins("  \n")


def test_unreadable_private_key_message_has_no_key_text() -> None:
    text = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n-----END OPENSSH PRIVATE KEY-----\n"
    with pytest.raises(TerminalError) as e:
        sftp.load_private_key(text)
    assert e.value.kind == "auth" and SECRET not in str(e.value)


def test_sftp_without_any_host_key_pin_is_refused_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FILEFEED_SFTP_KNOWN_HOSTS", raising=False)
    props = FeedProperties(destination_uri="sftp://u@127.0.0.1:9/x", sftp_password=SECRET)
    connects: list[object] = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connects.append(a))
    with pytest.raises(TerminalError) as e:
        open_sink(props).check()
    assert e.value.kind == "host_key" and connects == [] and SECRET not in str(e.value)


# -- GCS -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "transient", "kind"),
    [
        (gexc.Unauthorized("no"), False, "auth"),
        (gexc.Forbidden("no"), False, "permission"),
        (gexc.NotFound("no"), False, "not_found"),
        (gexc.PreconditionFailed("exists"), False, "conflict"),
        (gexc.TooManyRequests("slow down"), True, "throttled"),
        (gexc.ServiceUnavailable("later"), True, "server"),
        (gexc.InternalServerError("oops"), True, "server"),
        (gexc.BadRequest("bad"), False, "rejected"),
        (requests.ConnectionError("refused"), True, "network"),
        (requests.ReadTimeout("slow"), True, "timeout"),
        (gauth_exc.RefreshError("invalid_grant"), False, "auth"),
        (gauth_exc.DefaultCredentialsError("none"), False, "auth"),
        (gexc.RetryError("deadline", gexc.ServiceUnavailable("later")), True, "server"),
    ],
)
def test_gcs_errors(exc: BaseException, transient: bool, kind: str) -> None:
    assert_kind(gcs.classify(exc, "x"), transient, kind)


def test_gcs_bad_service_account_json_message_has_no_secret() -> None:
    props = FeedProperties(destination_uri="gs://bucket/p",
                           gcs_service_account_json='{"type": "service_account", "private_key": "' + SECRET + '"}')
    with pytest.raises(TerminalError) as e:
        open_sink(props).check()
    assert e.value.kind == "auth" and SECRET not in str(e.value)


# -- local / shared --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "transient", "kind"),
    [
        (errno.ENOSPC, True, "no_space"),
        (errno.EDQUOT, True, "no_space"),
        (errno.EIO, True, "io"),
        (errno.EACCES, False, "permission"),
        (errno.EROFS, False, "permission"),
        (errno.ENOENT, False, "not_found"),
        (errno.ECONNREFUSED, True, "network"),
    ],
)
def test_os_errors(code: int, transient: bool, kind: str) -> None:
    assert_kind(classify_os_error(OSError(code, "x"), "x"), transient, kind)


def test_registry_and_missing_dependency_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sinks.sink_class("file").__name__ == "LocalSink"
    with pytest.raises(TerminalError) as e:
        sinks.sink_class("ftp")
    assert e.value.kind == "config"
    monkeypatch.delitem(sinks._REGISTRY, "sftp")

    def missing(name: str) -> None:
        raise ModuleNotFoundError("No module named 'paramiko'", name="paramiko")

    monkeypatch.setattr(sinks.importlib, "import_module", missing)
    with pytest.raises(TerminalError) as e:
        sinks.sink_class("sftp")
    assert e.value.kind == "dependency" and "pip install 'paramiko'" in str(e.value)


# -- retries ---------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def __call__(self) -> float:
        return self.now


def test_retries_transient_then_succeeds() -> None:
    clock, calls = FakeClock(), []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("blip", kind="network")
        return "ok"

    assert with_retries(fn, attempts=5, max_seconds=60, base_delay=1.0, sleep=clock.sleep, clock=clock) == "ok"
    assert len(calls) == 3
    assert 0 <= clock.sleeps[0] <= 1.0 and 0 <= clock.sleeps[1] <= 2.0  # full jitter under the exponential cap


def test_retries_stop_at_attempts_and_never_retry_terminal() -> None:
    clock, calls = FakeClock(), []

    def transient() -> None:
        calls.append(1)
        raise TransientError("down", kind="network")

    with pytest.raises(TransientError):
        with_retries(transient, attempts=4, max_seconds=1e9, base_delay=0.1, sleep=clock.sleep, clock=clock)
    assert len(calls) == 4

    calls.clear()

    def terminal() -> None:
        calls.append(1)
        raise TerminalError("bad key", kind="auth")

    with pytest.raises(TerminalError):
        with_retries(terminal, attempts=4, max_seconds=60, base_delay=0.1, sleep=clock.sleep, clock=clock)
    assert len(calls) == 1


def test_retries_bounded_in_time() -> None:
    clock = FakeClock()

    def slow_failure() -> None:
        clock.now += 4.0  # each attempt itself takes 4 s
        raise TransientError("timeout", kind="timeout")

    with pytest.raises(TransientError):
        with_retries(slow_failure, attempts=100, max_seconds=10, base_delay=1.0, sleep=clock.sleep, clock=clock)
    assert clock.now <= 10 + 4.0  # never starts an attempt past the budget
