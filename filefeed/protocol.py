"""The mediarithmics plugin wire contract: status -> HTTP code per route, response shapes, body parsing.

Everything here follows the official Node SDK (@mediarithmics/plugins-nodejs-sdk): its route table, status codes and
response shapes; routes use only these helpers so a status can never reach the platform with the wrong code.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

MAX_BODY_BYTES = 12 * 1024 * 1024  # the SDK's limit since v0.40.1

# handler status -> HTTP code, per route, as the SDK maps them. Anything unlisted -> 500.
STATUS_CODES: dict[str, dict[str, int]] = {
    "external_segment_creation": {"ok": 200},
    "external_segment_connection": {"ok": 200, "error": 500, "external_segment_not_ready_yet": 502},
    "user_segment_update": {"ok": 200, "error": 500, "retry": 429, "no_eligible_identifier": 400},
    "batch_update": {"OK": 200, "ERROR": 400, "RETRY": 503},
    "troubleshoot": {"ok": 200, "error": 500, "not_implemented": 400},
    "authentication_status_queries": {"authenticated": 200, "not_authenticated": 200, "error": 500,
                                      "not_implemented": 400},
    "authentication": {"ok": 200, "error": 500, "not_implemented": 400},
    "logout": {"ok": 200, "error": 500, "not_implemented": 400},
    "dynamic_property_values_queries": {"ok": 200, "empty": 200, "error": 500, "not_implemented": 400},
    "test_authentication": {"ok": 200, "invalid_credentials": 401, "error": 500, "not_implemented": 400},
}

DELAY_HEADER = "x-mics-next-msg-delay"
JSON = "application/json"


class BadRequest(Exception):
    """The body cannot be used; the route answers its own error shape with this message."""


class MissingBody(Exception):
    """No body or `{}`: every feed POST route answers 500 {"error":"Missing request body"} (SDK filter)."""


class JSONAnswer(Response):
    """A 200 JSON answer with no other header: Starlette's Response, its two headers built without the generic
    checks (the hot route's answer, once per request)."""

    media_type = JSON

    def __init__(self, body: bytes) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type=JSON, headers=headers)


def empty_response(status_code: int = 200) -> Response:
    return Response(b"", status_code=status_code)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Parse JSON whatever the Content-Type. Missing or `{}` -> MissingBody; anything else unusable -> BadRequest."""
    if not raw or not raw.strip():
        raise MissingBody()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if not body:
        raise MissingBody()
    return body


def missing_body_response() -> Response:
    return json_response({"error": "Missing request body"}, 500)


def handler_response(route: str, result: dict[str, Any]) -> Response:
    """Map a handler result to its HTTP code; omit None fields and empty messages; set the delay header."""
    if (route == "user_segment_update" and result.get("status") == "ok" and len(result) == 3
            and result.get("data") is not None and result.get("stats") is not None):
        # the hot path's answer {"status": "ok", "data": [...], "stats": [...]}: nothing to omit, no header
        return JSONAnswer(orjson.dumps(result))
    status = result.get("status")
    code = STATUS_CODES[route].get(status, 500) if isinstance(status, str) else 500
    body = {k: v for k, v in result.items() if v is not None and not (k == "message" and v == "")}
    headers = None
    delay = body.get("next_msg_delay_in_ms")
    if delay:
        headers = {DELAY_HEADER: str(int(delay))}
    if route == "batch_update":
        # the batch body is exactly status, both counters and an optional message; the delay goes in the header only
        body = {k: body[k] for k in ("status", "sent_items_in_success", "sent_items_in_error", "message") if k in body}
    return json_response(body, code, headers)


def error_response(message: str, *, creation: bool = False, public: bool = False) -> Response:
    """An exception in a feed handler: 500 {"status":"error","message"} (+ visibility on creation)."""
    body: dict[str, Any] = {"status": "error", "message": message}
    if creation:
        body["visibility"] = "PUBLIC" if public else "PRIVATE"
    return json_response(body, 500)


def require_str(body: dict[str, Any], *names: str) -> list[str]:
    """The named fields as non-empty strings (ints accepted: ids are numbers in some SDK typings)."""
    values: list[str] = []
    missing: list[str] = []
    for name in names:
        v = body.get(name)
        if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
            missing.append(name)
        else:
            values.append(str(v))
    if missing:
        raise BadRequest(f"missing or invalid field(s): {', '.join(missing)}")
    return values
