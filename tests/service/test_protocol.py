"""Conformance: every route over real HTTP against `filefeed serve`, status codes and bodies as the official SDK answers them."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

FIXTURES = json.loads((Path(__file__).parent.parent / "fixtures" / "requests.json").read_text())


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from tests.conftest import start_filefeed

    tmp = tmp_path_factory.mktemp("proto")
    out = tmp / "delivery"
    out.mkdir()
    server = start_filefeed(tmp, feeds={
        "42": {"destination_uri": out.as_uri(), "identifier_types": "USER_EMAIL,USER_POINT,USER_ACCOUNT:7,"
               "USER_DEVICE_TECHNICAL_ID:MOBILE_ADVERTISING_ID"},
        "43": {"destination_uri": "ftp://nowhere", "file_format": "xml"},
        "44": {"destination_uri": "file:///proc/filefeed-cannot-write-here"},
    }, env={"PLUGIN_GROUP_ID": "com.example.feeds", "PLUGIN_VERSION": "1.2.3"})
    yield server
    server.stop()


FEED_POSTS = ["external_segment_creation", "external_segment_connection", "user_segment_update", "batch_update",
              "troubleshoot", "authentication_status_queries", "authentication", "logout",
              "dynamic_property_values_queries", "test_authentication", "authentication_status",
              "dynamic_property_values"]


def test_status_init_metadata(srv):
    with srv.client() as c:
        r = c.get("/v1/status")
        assert r.status_code == 200 and r.content == b""
        r = c.post("/v1/init", content=b'{"authentication_token":"x","worker_id":"y"}')
        assert r.status_code == 200 and r.content == b""
        r = c.get("/v1/metadata")
        body = r.json()
        assert r.status_code == 200
        assert body["runtime"] == "python" and body["group_id"] == "com.example.feeds"
        assert body["plugin_version"] == "1.2.3" and "artifact_id" not in body and isinstance(body["dependencies"], dict)


def test_log_level(srv):
    with srv.client() as c:
        assert c.put("/v1/log_level", content=b'{"level":"warn"}').status_code == 200
        assert c.get("/v1/log_level").json() == {"level": "WARN"}
        r = c.put("/v1/log_level", content=b'{"nope":1}')
        assert r.status_code == 400 and r.content == b""
        assert c.put("/v1/log_level", content=b'{"level":"Info"}').status_code == 200
        assert c.get("/v1/log_level").json() == {"level": "INFO"}


@pytest.mark.parametrize("route", FEED_POSTS)
@pytest.mark.parametrize("body", [b"", b"{}", b"  "])
def test_empty_body_is_500_missing_request_body(srv, route, body):
    r = srv.post(f"/v1/{route}", content=body)
    assert r.status_code == 500
    assert r.json() == {"error": "Missing request body"}


@pytest.mark.parametrize("route", FEED_POSTS)
def test_malformed_json_never_crashes(srv, route):
    r = srv.post(f"/v1/{route}", content=b'{"feed_id": "42", ')
    assert r.status_code in (400, 500)
    body = r.json()
    assert "JSON" in body["message"] and "Traceback" not in r.text
    with srv.client() as c:
        assert c.get("/v1/status").status_code == 200  # still serving


def test_json_parsed_whatever_the_content_type(srv):
    body = FIXTURES["external_segment_connection"]
    r = srv.post("/v1/external_segment_connection", body, headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_creation_ok_public(srv):
    r = srv.post("/v1/external_segment_creation", FIXTURES["external_segment_creation"])
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "visibility": "PUBLIC"}


def test_creation_invalid_properties_public_error_naming_properties(srv):
    r = srv.post("/v1/external_segment_creation", {"feed_id": "43", "datamart_id": "1", "segment_id": "2"})
    assert r.status_code == 500
    body = r.json()
    assert body["status"] == "error" and body["visibility"] == "PUBLIC"
    assert "destination_uri" in body["message"] and "file_format" in body["message"]


def test_creation_unwritable_destination(srv):
    r = srv.post("/v1/external_segment_creation", {"feed_id": "44", "datamart_id": "1", "segment_id": "2"})
    assert r.status_code == 500
    body = r.json()
    assert body["status"] == "error" and body["visibility"] == "PUBLIC" and "destination_uri" in body["message"]


def test_creation_unknown_feed(srv):
    r = srv.post("/v1/external_segment_creation", {"feed_id": "999", "datamart_id": "1", "segment_id": "2"})
    assert r.status_code == 500 and r.json()["status"] == "error" and "visibility" in r.json()


def test_creation_missing_feed_id(srv):
    r = srv.post("/v1/external_segment_creation", {"datamart_id": "1"})
    assert r.status_code == 500
    body = r.json()
    assert body["status"] == "error" and "feed_id" in body["message"] and body["visibility"] in ("PUBLIC", "PRIVATE")


def test_connection_error_is_500_without_visibility(srv):
    r = srv.post("/v1/external_segment_connection", {"feed_id": "44", "datamart_id": "1", "segment_id": "2"})
    assert r.status_code == 500 and r.json()["status"] == "error" and "visibility" not in r.json()


def test_user_segment_update_ok_with_batch_items_and_stats(srv):
    r = srv.post("/v1/user_segment_update", FIXTURES["user_segment_update"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and "message" not in body and "next_msg_delay_in_ms" not in body
    types = sorted(i["content"]["identifier_type"] for i in body["data"])
    assert types == ["MOBILE_ADVERTISING_ID", "USER_ACCOUNT", "USER_EMAIL", "USER_POINT"]
    for item in body["data"]:
        assert item["type"] == "BATCH_DELIVERY" and item["grouping_key"] == "UPSERT" and item["content"]
    assert {s["sync_result"] for s in body["stats"]} == {"PROCESSED"}
    assert "x-mics-next-msg-delay" not in r.headers


def test_user_segment_update_no_eligible_identifier_is_400(srv):
    body = dict(FIXTURES["user_segment_update"], user_identifiers=[{"type": "USER_AGENT", "vector_id": "v:1"}])
    r = srv.post("/v1/user_segment_update", body)
    assert r.status_code == 400 and r.json()["status"] == "no_eligible_identifier"


def test_user_segment_update_bad_envelope_is_error(srv):
    body = dict(FIXTURES["user_segment_update"], operation="MERGE", segment_id="../../etc")
    r = srv.post("/v1/user_segment_update", body)
    assert r.status_code == 500
    msg = r.json()["message"]
    assert r.json()["status"] == "error" and "operation" in msg and "segment_id" in msg


def test_user_segment_update_invalid_feed_properties(srv):
    body = dict(FIXTURES["user_segment_update"], feed_id="43")
    r = srv.post("/v1/user_segment_update", body)
    assert r.status_code == 500 and r.json()["status"] == "error"


def test_batch_update_statuses_upper_case_and_exact_body(srv):
    upd = srv.post("/v1/user_segment_update", FIXTURES["user_segment_update_delete"]).json()
    items = [orjson.dumps(i["content"]).decode() for i in upd["data"]]  # as JSON strings
    batch = dict(FIXTURES["batch_update"], batch_content=items)
    batch["context"] = dict(batch["context"], grouping_key="DELETE")
    r = srv.post("/v1/batch_update", batch)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "OK", "sent_items_in_success": 1, "sent_items_in_error": 0}


def test_batch_update_items_as_objects_and_invalid_items_counted(srv):
    upd = srv.post("/v1/user_segment_update", FIXTURES["user_segment_update"]).json()
    items = [i["content"] for i in upd["data"]] + ["not json", {"example": "an object item"}]
    r = srv.post("/v1/batch_update", dict(FIXTURES["batch_update"], batch_content=items))
    body = r.json()
    assert body["status"] in ("OK", "ERROR")
    assert body["sent_items_in_success"] == len(upd["data"]) and body["sent_items_in_error"] == 2


def test_batch_update_without_context_is_error_400(srv):
    r = srv.post("/v1/batch_update", {"batch_content": [], "ts": 1})
    assert r.status_code == 400
    body = r.json()
    assert body["status"] == "ERROR" and set(body) == {"status", "message", "sent_items_in_success",
                                                       "sent_items_in_error"}


def test_troubleshoot(srv):
    r = srv.post("/v1/troubleshoot", FIXTURES["troubleshoot"])
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and isinstance(r.json()["data"], dict)
    r = srv.post("/v1/troubleshoot", dict(FIXTURES["troubleshoot"], action="DROP_TABLES"))
    assert r.status_code == 400
    assert r.json() == {"status": "not_implemented", "message": "Action DROP_TABLES not supported"}


@pytest.mark.parametrize("route", ["authentication_status_queries", "authentication_status", "authentication",
                                   "logout"])
def test_oauth_routes_not_implemented(srv, route):
    key = {"authentication_status": "authentication_status_queries"}.get(route, route)
    r = srv.post(f"/v1/{route}", FIXTURES[key])
    assert r.status_code == 400 and r.json()["status"] == "not_implemented"


@pytest.mark.parametrize("route", ["dynamic_property_values_queries", "dynamic_property_values"])
def test_dynamic_property_values(srv, route):
    r = srv.post(f"/v1/{route}", FIXTURES["dynamic_property_values_queries"])
    assert r.status_code == 200
    data = {d["property_technical_name"]: [e["value"] for e in d["enum"]] for d in r.json()["data"]}
    assert data["file_format"] == ["csv", "parquet"] and "gzip" in data["compression"]


def test_test_authentication(srv, tmp_path):
    # embedded mode has no destination credentials: a request naming a feed tests the feed's own destination
    r = srv.post("/v1/test_authentication", {"feed_destination_id": "7", "feed_id": "42"})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = srv.post("/v1/test_authentication", {"feed_destination_id": "7"})
    assert r.status_code == 400 and r.json()["status"] == "not_implemented"


def test_oauth_redirect_url_is_500(srv):
    r = srv.post("/v1/oauth_redirect_url", {"feed_destination_id": "7", "plugin_version_id": "1"})
    assert r.status_code == 500 and r.json()["status"] == "error"


def test_body_limit_12mb(srv):
    big = b'{"feed_id":"42","pad":"' + b"x" * (13 * 1024 * 1024) + b'"}'
    r = srv.post("/v1/user_segment_update", content=big)
    assert r.status_code == 500 and "larger than" in r.json()["message"]
    ok = dict(FIXTURES["user_segment_update"], pad="x" * (11 * 1024 * 1024))
    assert srv.post("/v1/user_segment_update", ok).status_code == 200


def test_gateway_mode_refuses_to_start_without_credentials(tmp_path):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "FILEFEED_STAGING_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "filefeed", "serve", "--port", "1"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "PLUGIN_WORKER_ID" in (p.stderr + p.stdout)
