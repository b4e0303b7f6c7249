"""bench/hot_path.py drives the real hot route: its answers are the route's own, and its rows are really staged."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import orjson
import pytest

from bench import hot_path


def test_the_harness_serves_every_update_through_the_route_and_stages_its_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staged: list[int] = []
    answers: list[bytes] = []
    real_respond = hot_path.Exchange.respond

    def respond(self: hot_path.Exchange, response) -> None:
        answers.append(response.body)
        real_respond(self, response)

    async def run(args: argparse.Namespace) -> None:
        from filefeed.app import create_app

        app = create_app()
        async with app.app.router.lifespan_context(app.app):
            plugin = app.state.plugin
            await hot_path.serve_round(app.direct_routes[b"/v1/user_segment_update"], plugin, 1, 100, 16)
            staged.append(plugin.staging.rows_written)

    monkeypatch.setattr(hot_path.Exchange, "respond", respond)
    feeds = tmp_path / "feeds.toml"
    feeds.write_text(f'[feeds.42]\ndestination_uri = "{(tmp_path / "out").as_uri()}"\n'
                     'identifier_types = "USER_EMAIL,USER_POINT"\n')
    for key, value in {"FILEFEED_FEEDS": str(feeds), "FILEFEED_STAGING_DIR": str(tmp_path / "staging"),
                       "FILEFEED_MIN_FREE_BYTES": "0", "FILEFEED_FLUSH_CHECK_SECONDS": "3600"}.items():
        monkeypatch.setenv(key, value)
    asyncio.run(run(argparse.Namespace()))
    assert staged == [200]  # 100 updates of 2 new identifiers each, every one committed before its answer
    items = [orjson.loads(a)["data"] for a in answers]
    assert len(items) == 100 and all(len(i) == 2 and i[0]["type"] == "BATCH_DELIVERY" for i in items)
    assert len({i[1]["content"]["identifier"] for i in items}) == 100  # every request's identifiers are new


def test_a_side_that_answers_anything_but_200_fails_the_run(tmp_path: Path) -> None:
    class Refused:
        def serve(self, plugin, body, exchange) -> None:
            exchange.respond(type("R", (), {"status_code": 429, "body": b"{}"})())

    with pytest.raises(SystemExit, match="429"):
        asyncio.run(hot_path.serve_round(Refused(), None, 1, 20, 16))
