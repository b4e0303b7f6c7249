"""Secrets stay secret: distinctive credentials, wrong on purpose, through every operator surface.

One embedded run (2 workers) with an S3 secret, an SFTP password, an SFTP private key and a GCS service-account key,
each refused by the destination or unusable, plus a secret pasted into a destination URI; one gateway-mode run with
a distinctive PLUGIN_AUTHENTICATION_TOKEN (and a CLI run with a wrong one). Then every server log line, every HTTP
answer, every CLI output, /metrics, the troubleshoot data and every file name and JSON file under staging is searched
for the secret values (and the lines of the private key): none may appear.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import start_filefeed, wait_for
from tests.ops.helpers import cli, raw_props, send_batch, send_users, update_body
from tests.service.gateway_standin import GatewayStandIn

AWS_SECRET = "ffSECRETaws-7Qz9Lm2Xv8Kp4Wn6Rt1Yb3Hs5Jd0"
SFTP_PASSWORD = "ffSECRETsftpPw-Gh5Tr8Ue2Wq9Zx"
GCS_KEY_ID = "ffSECRETgcsKeyId-3f9a8b7c6d5e"
GCS_KEY_BODY = "ffSECRETgcsPrivateKeyMaterial0123456789abcdef"
URI_PASSWORD = "ffSECRETuriPw-Lk3Jh7Gf"
TOKEN = "ffSECRETgatewayToken-Mn4Bv6Cx8Za"
WRONG_TOKEN = "ffSECRETwrongToken-Qa1Ws2Ed3Rf"


def _private_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate()  # never authorized on the SFTP server
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()


def _gcs_json() -> str:
    return json.dumps({"type": "service_account", "project_id": "filefeed-test", "private_key_id": GCS_KEY_ID,
                       "private_key": f"-----BEGIN PRIVATE KEY-----\n{GCS_KEY_BODY}\n-----END PRIVATE KEY-----\n",
                       "client_email": "feed@filefeed-test.iam.gserviceaccount.com", "client_id": "1",
                       "token_uri": "http://127.0.0.1:9/token"})


def _staging_texts(root: Path) -> list[str]:
    """File names under staging, and the content of every JSON file (ledger, reasons, last errors, plans)."""
    out = []
    for p in root.rglob("*"):
        out.append(str(p))
        if p.is_file() and p.suffix == ".json":
            out.append(p.read_text(errors="replace"))
    return out


def _exercise(srv, feed: str, texts: list[str]) -> None:
    """The platform's calls on one feed, error paths included; every answer's text is kept."""
    base = {"feed_id": feed, "datamart_id": "1023", "segment_id": "451256"}
    for route in ("external_segment_creation", "external_segment_connection"):
        texts.append(srv.post(f"/v1/{route}", base).text)
    texts.append(srv.post("/v1/test_authentication", {**base, "feed_destination_id": "7"}).text)
    r = srv.post("/v1/user_segment_update", update_body(1, feed=feed))
    texts.append(r.text)
    if r.status_code == 200:
        items = [x["content"] for x in r.json()["data"]]
        texts.append(json.dumps(send_batch(srv, items, feed=feed)))
    texts.append(srv.post("/v1/troubleshoot", {**base, "action": "FETCH_DESTINATION_AUDIENCE"}).text)


def _assert_clean(texts: list[str], secrets: list[str]) -> None:
    blob = "\n".join(texts)
    leaked = [s[:12] + "..." for s in secrets if s in blob]
    assert not leaked, f"secret values found: {leaked}"


def test_no_secret_anywhere(tmp_path, servers, unique_prefix):
    key = _private_key()
    gcs_json = _gcs_json()
    secrets = [AWS_SECRET, SFTP_PASSWORD, GCS_KEY_ID, GCS_KEY_BODY, URI_PASSWORD, TOKEN, WRONG_TOKEN, key, gcs_json]
    secrets += [line for line in key.splitlines() if len(line) > 20 and "PRIVATE KEY" not in line]
    sftp = raw_props("sftp", servers, unique_prefix + "-k")
    feeds = {
        "51": raw_props("s3", servers, unique_prefix, aws_secret_access_key=AWS_SECRET),
        "52": {**{k: v for k, v in sftp.items() if k != "sftp_private_key"}, "sftp_password": SFTP_PASSWORD},
        "53": {**sftp, "sftp_private_key": key},
        "54": raw_props("gs", servers, unique_prefix, gcs_service_account_json=gcs_json),
        "56": {"destination_uri": f"sftp://feeder:{URI_PASSWORD}@127.0.0.1:1/upload"},
    }
    texts: list[str] = []
    srv = start_filefeed(tmp_path, feeds=feeds, workers=2)
    try:
        for feed in feeds:
            _exercise(srv, feed, texts)
        # the error paths were taken: creation refused, batches in error, failed rolls with their class
        assert json.loads(texts[0])["status"] == "error"
        wait_for(lambda: len(list(srv.staging.glob("feeds/*/*/*/failed/*/reason.json"))) >= 4, 60,
                 what="failed rolls of the four refused destinations")
        for args in (("status",), ("status", "--json"), ("flush",), ("retry",), ("verify",), ("verify", "--json"),
                     ("inspect", "51"), ("flush", "--dry-run")):
            p = cli(srv.env, *args)
            texts += [p.stdout, p.stderr]
        status = json.loads(cli(srv.env, "status", "--json").stdout)
        kinds = {f["kind"] for p in status["partitions"] for f in p["failed_rolls"]}
        assert "auth" in kinds, status
        with srv.client() as c:
            texts.append(c.get("/metrics").text)
        for feed in feeds:
            data = srv.post("/v1/troubleshoot", {"feed_id": feed, "action": "FETCH_DESTINATION_AUDIENCE"}).json()
            texts.append(json.dumps(data))
        assert any(json.loads(t).get("data", {}).get("last_errors") for t in texts[-len(feeds):])
    finally:
        srv.stop()
    texts.append(srv.log_text())
    texts += _staging_texts(srv.staging)
    _assert_clean(texts, secrets)

    # gateway mode: the token is the secret; a wrong token on the CLI takes the error path
    gw = GatewayStandIn(worker_id="Calavera", token=TOKEN)
    props = raw_props("s3", servers, unique_prefix + "-gw", aws_secret_access_key=AWS_SECRET)
    gw.routes["GET /v1/audience_segment_external_feeds/42/properties"] = {"status": "ok", "count": len(props), "data": [
        {"technical_name": k, "property_type": "STRING", "value": {"value": v}} for k, v in props.items()]}
    gtexts: list[str] = []
    gdir = tmp_path / "gateway"
    gdir.mkdir()
    try:
        gsrv = start_filefeed(gdir, workers=2, env={"PLUGIN_WORKER_ID": "Calavera", "PLUGIN_AUTHENTICATION_TOKEN": TOKEN,
                                                    "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(gw.port)})
        try:
            _exercise(gsrv, "42", gtexts)
            items = send_users(gsrv, range(3))
            gtexts.append(json.dumps(send_batch(gsrv, items)))
            assert gw.count("/v1/audience_segment_external_feeds/42/properties") >= 1
            for args in (("status",), ("flush",), ("verify",), ("retry",)):
                p = cli(gsrv.env, *args)
                gtexts += [p.stdout, p.stderr]
            wrong = {**gsrv.env, "PLUGIN_AUTHENTICATION_TOKEN": WRONG_TOKEN}
            p = cli(wrong, "verify")
            assert p.returncode == 1 and "401" in p.stdout, p.stdout + p.stderr
            gtexts += [p.stdout, p.stderr]
            p = cli(wrong, "flush")
            gtexts += [p.stdout, p.stderr]
            with gsrv.client() as c:
                gtexts.append(c.get("/metrics").text)
                gtexts.append(c.get("/v1/metadata").text)
        finally:
            gsrv.stop()
        gtexts.append(gsrv.log_text())
        gtexts += _staging_texts(gsrv.staging)
    finally:
        gw.close()
    assert any("authentication" in t or "auth" in t for t in gtexts)
    _assert_clean(gtexts, secrets)
