"""Gateway mode against a real HTTP stand-in: Basic auth, envelope, 404, TTL cache with jitter, no failure cached."""

from __future__ import annotations

import asyncio

import pytest

from config.settings import load_settings
from filefeed.context import GatewayContextSource, GatewayError, NotFound
from tests.service.gateway_standin import GatewayStandIn

FEED = "/v1/audience_segment_external_feeds/42"
PROPS = FEED + "/properties"


@pytest.fixture
def gw(tmp_path):
    g = GatewayStandIn()
    g.routes[f"GET {PROPS}"] = {"status": "ok", "count": 2, "data": [
        {"technical_name": "destination_uri", "property_type": "STRING", "value": {"value": (tmp_path / "o").as_uri()}},
        {"technical_name": "max_rows_per_file", "property_type": "INT", "value": {"value": 10}}]}
    yield g
    g.close()


def source(gw, token="Manny", ttl=600.0):
    s = load_settings(plugin_worker_id="Calavera", plugin_authentication_token=token, gateway_host="127.0.0.1",
                      gateway_port=gw.port, context_ttl_seconds=ttl, feeds=None)
    return GatewayContextSource(s)


def run(coro):
    return asyncio.run(coro)


def test_context_built_from_gateway_and_cached(gw):
    async def go():
        src = source(gw)
        ctx = await src.feed_context("42")
        again = await src.feed_context("42")
        await src.aclose()
        return ctx, again

    ctx, again = run(go())
    assert ctx.valid and ctx.props.max_rows_per_file == 10 and again is ctx
    assert [s.type for s in ctx.props.identifier_selectors(ctx.feed["selected_identifying_resources"])] == [
        "USER_EMAIL", "USER_DEVICE_TECHNICAL_ID"]
    assert gw.count(FEED) == 1 and gw.count(PROPS) == 1


def test_basic_auth_is_sent(gw):
    async def go():
        src = source(gw, token="wrong")
        try:
            await src.feed_context("42")
        finally:
            await src.aclose()

    with pytest.raises(GatewayError, match="401"):
        run(go())


def test_404_is_not_found(gw):
    async def go():
        src = source(gw)
        try:
            await src.feed_context("777")
        finally:
            await src.aclose()

    with pytest.raises(NotFound):
        run(go())


def test_failed_build_is_not_cached(gw):
    gw.fail_next[PROPS] = 1

    async def go():
        src = source(gw)
        with pytest.raises(GatewayError):
            await src.feed_context("42")
        ctx = await src.feed_context("42")
        await src.aclose()
        return ctx

    assert run(go()).valid
    assert gw.count(PROPS) == 2


def test_concurrent_calls_share_one_build_and_force_rebuilds(gw):
    gw.delay = 0.2

    async def go():
        src = source(gw)
        results = await asyncio.gather(*(src.feed_context("42") for _ in range(10)))
        forced = await src.feed_context("42", force=True)
        await src.aclose()
        return results, forced

    results, forced = run(go())
    assert all(r is results[0] for r in results) and forced is not results[0]
    assert gw.count(FEED) == 2


def test_ttl_expiry_and_jitter_bounds(gw):
    async def go():
        src = source(gw, ttl=0.2)
        ttls = [src.contexts.jittered_ttl() for _ in range(200)]
        a = await src.feed_context("42")
        await asyncio.sleep(0.25)
        b = await src.feed_context("42")
        await src.aclose()
        return ttls, a, b

    ttls, a, b = run(go())
    assert all(0.2 <= t <= 0.22 for t in ttls) and a is not b and gw.count(FEED) == 2


def test_destination_credentials_404_is_none_and_cached(gw):
    gw.routes["GET /v1/feed_destinations/7/credentials"] = {"status": "ok", "data": {
        "scheme": "API_TOKEN", "credentials": {"aws_secret_access_key": "x"}}}

    async def go():
        src = source(gw)
        found = await src.credentials("7")
        missing = await src.credentials("8")
        missing2 = await src.credentials("8")
        await src.aclose()
        return found, missing, missing2

    found, missing, missing2 = run(go())
    assert found == {"aws_secret_access_key": "x"} and missing is None and missing2 is None
    assert gw.count("/v1/feed_destinations/8/credentials") == 1


def test_serve_in_gateway_mode(gw, filefeed_factory):
    import json
    from pathlib import Path

    reqs = json.loads((Path(__file__).parent.parent / "fixtures" / "requests.json").read_text())
    srv = filefeed_factory(env={"PLUGIN_WORKER_ID": "Calavera", "PLUGIN_AUTHENTICATION_TOKEN": "Manny",
                                "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(gw.port)})
    r = srv.post("/v1/external_segment_creation", reqs["external_segment_creation"])
    assert r.status_code == 200 and r.json() == {"status": "ok", "visibility": "PUBLIC"}
    r = srv.post("/v1/user_segment_update", reqs["user_segment_update"])
    assert r.status_code == 200 and [i["content"]["identifier_type"] for i in r.json()["data"]] == [
        "USER_EMAIL", "MOBILE_ADVERTISING_ID"]
    assert "Manny" not in srv.log_text()
