"""Hostile input: fuzz every feed route's body over real HTTP.

The server must only answer the protocol's own codes and shapes (a 5xx is `{"error":"Missing request body"}`,
`{"status":"error","message":...}`, batch_update's RETRY 503 or connection's 502), never a stack trace, never an
unhandled-exception 500 ("internal error (...)"), never die, and never write outside its staging root and the
feed's destination folder.

FILEFEED_FUZZ_EXAMPLES (default 200) examples per route, plus the fixed cases (10,000-level nesting, huge
strings, >12 MB bodies with and without Content-Length, invalid UTF-8, NUL and unicode in ids).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filefeed.protocol import DELAY_HEADER, MAX_BODY_BYTES, STATUS_CODES
from tests.reliability.helpers import Group, env_int, record_summary

pytestmark = pytest.mark.reliability

EXAMPLES = env_int("FILEFEED_FUZZ_EXAMPLES", 200)
MARK = f"hostile{uuid.uuid4().hex[:8]}"
FIXTURES = json.loads((Path(__file__).parents[1] / "fixtures" / "requests.json").read_text())
ROUTES = {name: name for name in STATUS_CODES} | {"oauth_redirect_url": "oauth_redirect_url",
                                                  "authentication_status": "authentication_status_queries",
                                                  "dynamic_property_values": "dynamic_property_values_queries"}
BASE_BODIES = {
    **{k: v for k, v in FIXTURES.items() if k in STATUS_CODES},
    "test_authentication": {"feed_destination_id": "7", "feed_id": "42"},
    "oauth_redirect_url": {"feed_destination_id": "7", "plugin_version_id": "9"},
}
BASE_BODIES["authentication_status"] = BASE_BODIES["authentication_status_queries"]
BASE_BODIES["dynamic_property_values"] = BASE_BODIES["dynamic_property_values_queries"]
BASE_BODIES["user_segment_update"] = {**FIXTURES["user_segment_update"], "segment_id": "77"}
STATS: dict[str, int] = {"requests": 0, "fixed_cases": 0}
ANSWERS: dict[str, dict[int, int]] = {}

# ids that try to escape a folder or confuse a parser
ATTACKS = ["..", ".", "../", "../../../../tmp/" + MARK, "/tmp/" + MARK, "..%2f..%2ftmp%2f" + MARK, "%2e%2e",
           "%2e%2e%2f" + MARK, "a\x00b", "\x00", MARK + "\x00/../x", "..\\..\\" + MARK, "\u202e" + MARK,
           "\ufeff", "ﬀ", "\udcff", "x" * 70, "x" * 100_000, "", " ", "42\n", "42/../43", "CON", "~root",
           "${HOME}", "{feed_id}", "42?x=1", "42#x", "é" * 65]


def scalar() -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                     st.text(max_size=40), st.sampled_from(ATTACKS))


JSON = st.recursive(scalar(), lambda c: st.lists(c, max_size=5) | st.dictionaries(
    st.text(max_size=12) | st.sampled_from(["feed_id", "segment_id", "type", "ref", "operation"]), c, max_size=5),
    max_leaves=25)


def mutated(base: dict) -> st.SearchStrategy:
    """The valid body with each field kept, dropped, or replaced by hostile JSON; sometimes extra fields."""
    fields = {k: st.one_of(st.just(v), st.just(None), JSON, st.sampled_from(ATTACKS)) for k, v in base.items()}
    return st.fixed_dictionaries(fields, optional={"extra": JSON}).map(
        lambda d: {k: v for k, v in d.items() if v is not None})


def update_items() -> st.SearchStrategy:
    ident = st.fixed_dictionaries({"type": st.sampled_from(["USER_ACCOUNT", "USER_EMAIL", "USER_POINT",
                                                             "USER_AGENT", "USER_DEVICE_POINT", "NOPE"]) | JSON},
                                  optional={"user_account_id": JSON | st.sampled_from(ATTACKS),
                                            "hash": JSON | st.sampled_from(ATTACKS), "email": JSON,
                                            "user_point_id": JSON | st.sampled_from(ATTACKS),
                                            "vector_id": JSON, "compartment_id": JSON,
                                            "technical_identifiers": JSON})
    return st.lists(ident | JSON, max_size=6)


def batch_items() -> st.SearchStrategy:
    item = st.fixed_dictionaries(
        {"ref": st.sampled_from(ATTACKS) | JSON | st.just("w1-1-00000001"),
         "segment_id": st.sampled_from(["77", *ATTACKS]) | JSON,
         "operation": st.sampled_from(["UPSERT", "DELETE", "x"]) | JSON,
         "identifier_type": st.sampled_from(["USER_ACCOUNT", MARK]) | JSON,
         "identifier": st.sampled_from(ATTACKS) | st.text(max_size=30) | JSON,
         "ts": st.integers(-(2**63), 2**63 - 1) | JSON})
    return st.lists(item | item.map(json.dumps) | JSON, max_size=6)


def body_for(route: str) -> st.SearchStrategy:
    base = BASE_BODIES[route]
    options = [JSON, mutated(base)]
    if route == "user_segment_update":
        options.append(st.builds(lambda b, ids: {**b, "user_identifiers": ids}, mutated(base), update_items()))
        options.append(update_items().map(lambda ids: {**base, "user_identifiers": ids}))
    if route == "batch_update":
        options.append(st.builds(lambda ctx, items: {"batch_content": items, "ts": 1, "context": ctx},
                                 mutated(base["context"]) | JSON, batch_items()))
        options.append(batch_items().map(lambda items: {**base, "batch_content": items}))
    return st.one_of(*options)


def encode(body) -> bytes:
    return json.dumps(body, ensure_ascii=True).encode()  # big ints and lone surrogates as JSON allows them


RAW = st.one_of(st.binary(max_size=300), st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
                st.sampled_from([b"\xff\xfe{", b'{"feed_id":"\xc3\x28"}', b'{"feed_id":"42"' + b"\x00" * 10 + b"}",
                                 b"[]", b"null", b"1", b'"x"', b"{}", b"  ", b'{"a":1,"a":2}', b"\xef\xbb\xbf{}"]))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    dest = tmp / "dest"
    dest.mkdir()
    g = Group(tmp)
    feeds = {"42": {"destination_uri": dest.as_uri(), "identifier_types": "USER_EMAIL,USER_ACCOUNT,USER_POINT,"
                    "USER_AGENT,USER_DEVICE_TECHNICAL_ID:MOBILE_ADVERTISING_ID", "max_buffer_age_seconds": 1}}
    srv = g.start(feeds=feeds, workers=2, env={"FILEFEED_SEAL_AFTER_SECONDS": "0.2", "FILEFEED_BATCH_WAIT_SECONDS": "1",
                                               "FILEFEED_FLUSH_CHECK_SECONDS": "1"})
    before = _outside_snapshot(tmp)
    client = httpx.Client(base_url=srv.url, timeout=60, trust_env=False)
    try:
        yield srv, client, tmp, dest, before
    finally:
        client.close()
        g.close()


WATCHED = [Path("/tmp"), Path("/srv"), Path("/etc"), Path("/root"), Path(__file__).parents[2]]


def _outside_snapshot(tmp: Path) -> set[str]:
    """Top-level and second-level names of the watched folders (cheap), plus everything under `tmp`."""
    names: set[str] = set()
    for top in WATCHED:
        try:
            for e in os.scandir(top):
                names.add(e.path)
        except OSError:
            continue
    for p in tmp.rglob("*"):
        names.add(str(p))
    return names


def check_answer(route: str, r: httpx.Response) -> None:
    name = ROUTES[route]
    STATS["requests"] += 1
    ANSWERS.setdefault(route, {}).setdefault(r.status_code, 0)
    ANSWERS[route][r.status_code] += 1
    assert "Traceback" not in r.text and 'File "' not in r.text, f"{route}: stack trace in the answer: {r.text[:500]}"
    allowed = set(STATUS_CODES.get(name, {}).values()) | {500}
    assert r.status_code in allowed, f"{route}: HTTP {r.status_code} is not a code of this route: {r.text[:300]}"
    if r.status_code < 500 and not r.content:
        return
    body = r.json()  # every answer with a body is JSON
    assert isinstance(body, dict), f"{route}: {r.text[:200]}"
    if r.status_code == 500:
        if body == {"error": "Missing request body"}:
            return
        assert body.get("status") == "error" and isinstance(body.get("message"), str), \
            f"{route}: a 500 outside the protocol's error shapes: {r.text[:300]}"
        assert set(body) <= {"status", "message", "visibility"}, f"{route}: {r.text[:300]}"
        assert not body["message"].startswith("internal error"), \
            f"{route}: an unhandled exception reached the platform: {r.text[:300]}"
    elif r.status_code == 503:
        assert name == "batch_update" and body.get("status") == "RETRY" and r.headers.get(DELAY_HEADER), r.text[:300]
    elif r.status_code == 502:
        assert name == "external_segment_connection" and body.get("status") == "external_segment_not_ready_yet"
    if name == "batch_update":
        assert set(body) <= {"status", "sent_items_in_success", "sent_items_in_error", "message"} or \
            r.status_code == 500, r.text[:300]


def send(client: httpx.Client, route: str, content: bytes, **kw) -> httpx.Response:
    r = client.post(f"/v1/{route}", content=content, **kw)
    check_answer(route, r)
    return r


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzz_route(hostile, route):
    srv, client, *_ = hostile

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(body_for(route).map(encode), RAW))
    def run(body: bytes):
        send(client, route, body)

    run()
    assert srv.proc.poll() is None, "the server died"
    assert client.get("/v1/status").status_code == 200


def test_fixed_hostile_cases(hostile):
    srv, client, *_ = hostile
    deep_list = b"[" * 10_000 + b"]" * 10_000
    deep_obj = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    usu = FIXTURES["user_segment_update"]
    cases: list[tuple[str, bytes]] = []
    for route in ROUTES:
        cases += [
            (route, deep_list), (route, deep_obj),
            (route, b'{"feed_id":"42","segment_id":' + deep_list + b"}"),
            (route, b'{"feed_id":"42","x":"' + b"\xff" * 100 + b'"}'),
            (route, b'{"feed_id":"42\\u0000","segment_id":"\\u0000"}'),
            (route, json.dumps({"feed_id": "42", "segment_id": "x" * (6 * 1024 * 1024)}).encode()),
        ]
    huge_ids = {**usu, "user_identifiers": [{"type": "USER_ACCOUNT", "user_account_id": "y" * (11 * 1024 * 1024),
                                             "creation_ts": 1}]}
    cases.append(("user_segment_update", json.dumps(huge_ids).encode()))
    many = {**usu, "user_identifiers": [{"type": "USER_ACCOUNT", "user_account_id": f"{MARK}-{i}"}
                                        for i in range(100_000)]}
    cases.append(("user_segment_update", json.dumps(many).encode()))
    deep_ident = b'{"feed_id":"42","session_id":"1","datamart_id":"1","segment_id":"77","ts":1,"operation":"UPSERT",' \
                 b'"user_identifiers":[' + deep_obj + b"]}"
    cases.append(("user_segment_update", deep_ident))
    batch = {"batch_content": [json.dumps({"ref": "../" * 20, "identifier": "z" * 2_000_000})] * 3,
             "context": {"feed_id": "42", "segment_id": "77", "grouping_key": "UPSERT"}}
    cases.append(("batch_update", json.dumps(batch).encode()))
    for route, content in cases:
        send(client, route, content)
        STATS["fixed_cases"] += 1
    # bodies over 12 MB: with a Content-Length, and streamed (chunked, no Content-Length)
    big = b'{"feed_id":"42","pad":"' + b"p" * (MAX_BODY_BYTES + 1024) + b'"}'
    for route in ("user_segment_update", "batch_update", "external_segment_creation", "troubleshoot"):
        r = send(client, route, big)
        assert r.status_code in (400, 500) and "larger than" in r.text, r.text[:300]

        def chunks():
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        r = client.post(f"/v1/{route}", content=chunks())
        check_answer(route, r)
        assert r.status_code in (400, 500) and "larger than" in r.text, r.text[:300]
        STATS["fixed_cases"] += 2
    # a body just under the limit is read (not refused for its size)
    ok = json.dumps({**usu, "segment_id": "77", "pad": "p" * (MAX_BODY_BYTES - 4096)}).encode()
    assert len(ok) < MAX_BODY_BYTES
    r = send(client, "user_segment_update", ok)
    assert r.status_code == 200, r.text[:300]
    assert srv.proc.poll() is None and client.get("/v1/status").status_code == 200


def test_no_write_outside_staging_and_destination(hostile):
    """Runs after the fuzzing (file order): the server stayed up and wrote only under its staging root and the
    destination folder; no path built from a hostile id exists anywhere we can see."""
    srv, client, tmp, dest, before = hostile
    assert srv.proc.poll() is None, f"the server died:\n{srv.log_text()[-3000:]}"
    assert client.get("/v1/status").status_code == 200
    after = _outside_snapshot(tmp)
    staging = srv.staging
    new = sorted(p for p in after - before
                 if not (p.startswith(str(staging) + "/") or p.startswith(str(dest) + "/")
                         or re.fullmatch(re.escape(str(tmp)) + r"/(serve-\d+\.log|feeds-\d+\.toml)", p)
                         or p.startswith("/tmp/pytest-of-") or p.startswith("/tmp/tmp")
                         or p.startswith("/tmp/filefeed-reliability")))
    suspicious = [p for p in new if MARK in p or ".." in p]
    assert not suspicious, f"paths built from hostile ids: {suspicious}"
    leaked = [str(p) for top in (Path("/tmp"), Path("/srv"), staging.parent)
              for p in top.glob(f"**/*{MARK}*") if str(staging) not in str(p) and str(dest) not in str(p)]
    assert not leaked, f"hostile names outside staging and destination: {leaked[:10]}"
    # inside the staging root, every partition folder is a safe id
    bad = [str(p) for p in (staging / "feeds").glob("*/*/*")
           if not all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", part) for part in p.relative_to(staging / "feeds").parts)]
    assert not bad, f"unsafe partition folders: {bad}"
    # and the destination holds only names under the template's folder
    outside_dest = [str(p) for p in dest.rglob("*") if not os.path.realpath(p).startswith(str(dest))]
    assert not outside_dest
    log = srv.log_text()
    assert "Something bad happened" not in log, f"unhandled exceptions were logged:\n" \
        f"{[ln for ln in log.splitlines() if 'Something bad' in ln][:5]}"
    record_summary("hostile_input", {"routes": len(ROUTES), "examples_per_route": EXAMPLES,
                                     "inputs_tried": STATS["requests"], "fixed_cases": STATS["fixed_cases"],
                                     "server_died": False, "writes_outside_staging": len(suspicious) + len(leaked),
                                     "answers_by_route": ANSWERS})
