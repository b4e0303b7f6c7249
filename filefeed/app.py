"""The plugin's HTTP routes. Thin: parse, call one pipeline function, map its result to the protocol's code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from config.problems import ConfigFileError
from config.settings import ServiceSettings, load_settings
from filefeed import __version__, guard, hotpath, lifecycle, logs, metrics, server
from filefeed.context import ContextSource, FeedContext, GatewayError, NotFound, context_source
from filefeed.protocol import (
    BadRequest,
    MissingBody,
    empty_response,
    error_response,
    handler_response,
    json_response,
    missing_body_response,
    parse_json_body,
    require_str,
)
from pipeline import batch, delivery, lanes, ledger, recent_rows, scheduler, shared, snapshot, troubleshoot
from pipeline.identifiers import RequestError, check_identifier_count
from pipeline.ingest import StagedUpdate, stage_update
from pipeline.staging import Staging

log = logging.getLogger("filefeed")


class Plugin:
    """Per-process state: settings, context source, staging. Built in the lifespan of each worker."""

    def __init__(self, settings: ServiceSettings, source: ContextSource | None = None):
        self.settings = settings
        self.source = source or context_source(settings)
        self.staging = Staging(
            settings.staging_dir,
            seal_after_seconds=settings.seal_after_seconds,
            max_segment_bytes=settings.max_segment_bytes,
            journal_room_bytes=settings.journal_room_bytes,
            dedup_window=settings.dedup_window,
            min_free_bytes=settings.min_free_bytes,
            max_staged_bytes=settings.max_staged_bytes,
            max_open_files=settings.max_open_files,
            inline_commit=settings.commit_mode == "inline",
        )
        self.tasks: list[asyncio.Task] = []
        delivery.configure(settings)
        self.lanes = lanes.Lanes(settings.destination_concurrency, settings.destination_queue)

    async def context(self, feed_id: str, *, force: bool = False) -> FeedContext:
        return await self.source.feed_context(feed_id, force=force)


FeedHandler = Callable[[Plugin, dict[str, Any]], Awaitable[Response]]
# The synchronous start of a hot handler (filefeed/hotpath.py): the answer, the staged update to wait for, or None
# when it needs to wait for something else first (then the async handler serves the request).
FeedStart = Callable[[Plugin, dict[str, Any]], "Response | StagedUpdate | None"]


class FeedEndpoint:
    """A feed POST handler with the SDK's filters: body parsing, empty-body 500, exceptions as 500 error.

    Served two ways with the same answers: `await endpoint(plugin, read)` (the Starlette route and the ASGI hot path),
    and `endpoint.serve(plugin, body, exchange)` straight from the HTTP protocol (filefeed/hotpath.py). There, a
    handler with a synchronous `start` answers without a coroutine or a task whenever it has everything at hand.
    """

    def __init__(self, route: str, handler: FeedHandler, *, creation: bool = False, start: FeedStart | None = None):
        self.route = route
        self.handler = handler
        self.creation = creation
        self.start = start

    async def __call__(self, plugin: Plugin, read: Callable[[], Awaitable[bytes]]) -> Response:
        started = time.perf_counter()
        try:
            body = parse_json_body(await read())
        except Exception as e:
            return self._done(self._error(plugin, e), started, None)
        return await self._handled(plugin, body, started)

    async def _handled(self, plugin: Plugin, body: Any, started: float) -> Response:
        """The async handler's answer to a parsed body, failures mapped, counted and logged."""
        try:
            response = await self.handler(plugin, body)
        except Exception as e:
            response = self._error(plugin, e)
        return self._done(response, started, body)

    def serve(self, plugin: Plugin, raw: bytes, exchange: hotpath.Exchange) -> None:
        """Answer the request whose whole body is `raw` through `exchange`, now or once staging has committed."""
        started = time.perf_counter()
        body: Any = None
        try:
            body = parse_json_body(raw)
            step = self.start(plugin, body) if self.start is not None else None
        except Exception as e:
            exchange.respond(self._done(self._error(plugin, e), started, body))
            return
        if step is None:
            exchange.spawn(self._serve_async(plugin, body, started, exchange))
        elif isinstance(step, StagedUpdate):
            step.future.add_done_callback(lambda _: self._answer_staged(plugin, step, body, started, exchange))
        else:
            exchange.respond(self._done(step, started, body))

    async def _serve_async(self, plugin: Plugin, body: Any, started: float, exchange: hotpath.Exchange) -> None:
        exchange.respond(await self._handled(plugin, body, started))

    def _answer_staged(self, plugin: Plugin, staged: StagedUpdate, body: Any, started: float,
                       exchange: hotpath.Exchange) -> None:
        try:
            response = _update_response(staged.feed_id, staged.answer())
        except Exception as e:
            response = self._error(plugin, e)
        exchange.respond(self._done(response, started, body))

    def _error(self, plugin: Plugin, e: Exception) -> Response:
        route, creation = self.route, self.creation
        if isinstance(e, MissingBody):
            return missing_body_response()
        if isinstance(e, ClientDisconnect):  # the body never came whole (filefeed.guard closed the connection)
            return empty_response(408)
        if isinstance(e, (BadRequest, RequestError)):
            return _bad_request(route, str(e), creation)
        if isinstance(e, (NotFound, ConfigFileError)):  # ConfigFileError: the embedded feeds file, broken since start
            return error_response(str(e), creation=creation, public=creation)
        if isinstance(e, GatewayError):
            return _gateway_unavailable(route, str(e), plugin.settings.retry_delay_ms, creation)
        # never a stack trace to the platform, never a dead worker
        log.error("Something bad happened on %s", route, exc_info=e, extra={"route": route})
        return _internal_error(route, f"internal error ({type(e).__name__})", plugin.settings.retry_delay_ms,
                               creation)

    def _done(self, response: Response, started: float, body: Any) -> Response:
        elapsed = time.perf_counter() - started
        code = response.status_code
        metrics.observe_request(self.route, code, elapsed)
        if log.isEnabledFor(logs.request_level(code)):
            _log_request(self.route, code, elapsed, body)
        return response


def feed_endpoint(route: str, handler: FeedHandler, *, creation: bool = False) -> FeedEndpoint:
    return FeedEndpoint(route, handler, creation=creation, start=FEED_STARTS.get(route))


def feed_route(route: str, handler: FeedHandler, *, creation: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """`feed_endpoint` as a Starlette endpoint."""
    endpoint = feed_endpoint(route, handler, creation=creation)

    async def starlette_endpoint(request: Request) -> Response:
        return await endpoint(request.scope["app"].state.plugin, lambda: hotpath.read_body(request.scope,
                                                                                           request.receive))

    return starlette_endpoint


def _log_request(route: str, code: int, elapsed: float, body: Any) -> None:
    if isinstance(body, dict):
        ctx_ = body.get("context") if isinstance(body.get("context"), dict) else {}
        logs.log_request(log, route, code, elapsed, feed_id=body.get("feed_id") or ctx_.get("feed_id"),
                         segment_id=body.get("segment_id") or ctx_.get("segment_id"))
    else:
        logs.log_request(log, route, code, elapsed)


def _internal_error(route: str, message: str, delay_ms: int, creation: bool) -> Response:
    """A surprise: batch_update keeps its own shape (RETRY: nothing is lost, a retried batch is never doubled)."""
    if route == "batch_update":
        return handler_response(route, batch.batch_answer("RETRY", message=message, delay_ms=delay_ms))
    return error_response(message, creation=creation)


def _bad_request(route: str, message: str, creation: bool) -> Response:
    if route == "batch_update":
        return handler_response(route, batch.batch_answer("ERROR", message=message))
    if route in ("troubleshoot", "authentication", "logout", "dynamic_property_values_queries",
                 "authentication_status_queries", "test_authentication"):
        return json_response({"status": "error", "message": message}, 500)
    return error_response(message, creation=creation, public=creation)


def _gateway_unavailable(route: str, message: str, delay_ms: int, creation: bool) -> Response:
    """The platform's gateway failed: ask for a retry where the route has one, else the error shape."""
    msg = f"platform gateway unavailable: {message}"
    if route == "user_segment_update":
        return handler_response(route, {"status": "retry", "message": msg, "next_msg_delay_in_ms": delay_ms})
    if route == "batch_update":
        return handler_response(route, batch.batch_answer("RETRY", message=msg, delay_ms=delay_ms))
    return error_response(msg, creation=creation)


# ---- feed routes ---------------------------------------------------------------------------------------------------
async def external_segment_creation(plugin: Plugin, body: dict) -> Response:
    (feed_id,) = require_str(body, "feed_id")
    ctx = await plugin.context(feed_id, force=True)  # the only route that bypasses the cache
    result = await lifecycle.check_destination_within(plugin.lanes, ctx, plugin.settings, True)
    if result["status"] == "ok":
        result.setdefault("visibility", "PUBLIC")
    return handler_response("external_segment_creation", result)


async def external_segment_connection(plugin: Plugin, body: dict) -> Response:
    (feed_id,) = require_str(body, "feed_id")
    ctx = await plugin.context(feed_id)
    result = await lifecycle.check_destination_within(plugin.lanes, ctx, plugin.settings, False)
    result.pop("visibility", None)
    return handler_response("external_segment_connection", result)


def _update_feed(plugin: Plugin, body: dict) -> str:
    (feed_id,) = require_str(body, "feed_id")
    check_identifier_count(body.get("user_identifiers"), plugin.settings.max_identifiers_per_update)
    return feed_id


def _stage_update(plugin: Plugin, feed_id: str, ctx: FeedContext, body: dict) -> Response | StagedUpdate:
    if not ctx.valid:
        return handler_response("user_segment_update", {"status": "error", "message": f"feed {feed_id} has invalid "
                                                        f"properties: {ctx.error}"})
    step = stage_update(plugin.staging, ctx, feed_id, body, plugin.settings.retry_delay_ms)
    if isinstance(step, dict):
        return _update_response(feed_id, step)
    return step


def _update_response(feed_id: str, result: dict) -> Response:
    metrics.observe_update(feed_id, result)
    return handler_response("user_segment_update", result)


def start_user_segment_update(plugin: Plugin, body: dict) -> Response | StagedUpdate | None:
    """user_segment_update without waiting, when the feed's context is at hand (None: it must be fetched)."""
    feed_id = _update_feed(plugin, body)
    ctx = plugin.source.cached(feed_id)
    if ctx is None:
        return None
    return _stage_update(plugin, feed_id, ctx, body)


async def user_segment_update(plugin: Plugin, body: dict) -> Response:
    feed_id = _update_feed(plugin, body)
    step = _stage_update(plugin, feed_id, await plugin.context(feed_id), body)
    if not isinstance(step, StagedUpdate):
        return step
    with contextlib.suppress(Exception):  # answer() reads the outcome, failure included
        await step.future
    return _update_response(feed_id, step.answer())


async def batch_update(plugin: Plugin, body: dict) -> Response:
    context = body.get("context")
    if not isinstance(context, dict):
        raise BadRequest("context must be an object with feed_id")
    (feed_id,) = require_str(context, "feed_id")
    ctx = await plugin.context(feed_id)
    if not ctx.valid:
        return handler_response("batch_update", batch.batch_answer(
            "ERROR", message=f"feed {feed_id} has invalid properties: {ctx.error}"))
    try:
        result = await lanes.deliver_within_deadline(plugin.lanes, plugin.staging, ctx, body, plugin.settings)
    except ledger.LedgerError as e:  # locked past its timeout, or the volume is full: nothing was counted yet
        log.warning("batch_update: %s", e, extra={"route": "batch_update", "outcome": "retry"})
        result = batch.batch_answer("RETRY", message=str(e)[:1000], delay_ms=plugin.settings.retry_delay_ms)
    return handler_response("batch_update", result)


async def troubleshoot_route(plugin: Plugin, body: dict) -> Response:
    action = body.get("action")
    if action != "FETCH_DESTINATION_AUDIENCE":
        return handler_response("troubleshoot", {"status": "not_implemented",
                                                 "message": f"Action {action} not supported"})
    (feed_id,) = require_str(body, "feed_id")
    ctx = await plugin.context(feed_id)
    data = await run_in_threadpool(troubleshoot.destination_audience, plugin.staging, ctx, body.get("segment_id"))
    return handler_response("troubleshoot", {"status": "ok", "data": data})


async def test_authentication(plugin: Plugin, body: dict) -> Response:
    (dest_id,) = require_str(body, "feed_destination_id")
    try:
        creds = await plugin.source.credentials(dest_id)
    except GatewayError:
        return json_response({"status": "error", "message": "Could not fetch feed destination credentials"}, 500)
    ctx = None
    if isinstance(body.get("feed_id"), (str, int)):
        ctx = await plugin.context(str(body["feed_id"]))
    result = await run_in_threadpool(lifecycle.test_credentials, ctx, creds, plugin.settings)
    return handler_response("test_authentication", result)


async def authentication_status(plugin: Plugin, body: dict) -> Response:
    return handler_response("authentication_status_queries", lifecycle.oauth_not_used())


async def authentication(plugin: Plugin, body: dict) -> Response:
    return handler_response("authentication", lifecycle.oauth_not_used())


async def logout(plugin: Plugin, body: dict) -> Response:
    return handler_response("logout", lifecycle.oauth_not_used())


async def dynamic_property_values(plugin: Plugin, body: dict) -> Response:
    return handler_response("dynamic_property_values_queries", lifecycle.dynamic_property_values())


async def oauth_redirect_url(plugin: Plugin, body: dict) -> Response:
    # the SDK's default handler throws: file destinations have no OAuth login page
    return error_response("OAuth is not used by file destinations")


# ---- base routes ---------------------------------------------------------------------------------------------------
async def status(request: Request) -> Response:
    plugin: Plugin = request.app.state.plugin
    s = plugin.settings
    ready = s.embedded or bool(s.plugin_worker_id and s.plugin_authentication_token)
    return empty_response(200 if ready else 503)


async def init(request: Request) -> Response:
    return empty_response(200)


async def put_log_level(request: Request) -> Response:
    try:
        body = parse_json_body(await request.body())
    except (MissingBody, BadRequest):
        return empty_response(400)
    level = body.get("level")
    if not isinstance(level, str) or not logs.set_level(level, request.app.state.plugin.settings.staging_dir):
        return empty_response(400)
    return empty_response(200)


async def get_log_level(request: Request) -> Response:
    return json_response({"level": logs.current_level(request.app.state.plugin.settings.staging_dir)})


async def metadata(request: Request) -> Response:
    body: dict[str, Any] = {"runtime": "python", "runtime_version": platform.python_version()}
    for key, env in (("group_id", "PLUGIN_GROUP_ID"), ("artifact_id", "PLUGIN_ARTIFACT_ID"),
                     ("plugin_type", "PLUGIN_TYPE"), ("plugin_version", "PLUGIN_VERSION"),
                     ("plugin_build", "PLUGIN_BUILD")):
        if os.environ.get(env):
            body[key] = os.environ[env]
    body["dependencies"] = lifecycle.dependency_versions(__version__)
    return json_response(body)


async def metrics_route(request: Request) -> Response:
    # on the loop: under a millisecond (the counters' few per-process files, and gauges a background thread keeps)
    payload, content_type = metrics.render(request.app.state.plugin.staging)
    return Response(payload, media_type=content_type)


FEED_ROUTES: dict[str, FeedHandler] = {
    "external_segment_creation": external_segment_creation,
    "external_segment_connection": external_segment_connection,
    "user_segment_update": user_segment_update,
    "batch_update": batch_update,
    "troubleshoot": troubleshoot_route,
    "authentication_status_queries": authentication_status,
    "authentication": authentication,
    "logout": logout,
    "dynamic_property_values_queries": dynamic_property_values,
    "test_authentication": test_authentication,
    "oauth_redirect_url": oauth_redirect_url,
}
HOT_ROUTES = ("user_segment_update", "batch_update")  # served by filefeed/hotpath.py ahead of Starlette's router
FEED_STARTS: dict[str, FeedStart] = {"user_segment_update": start_user_segment_update}
LEGACY_PATHS = {"authentication_status": "authentication_status_queries",
                "dynamic_property_values": "dynamic_property_values_queries"}


def routes() -> list[Route]:
    # the router tries routes in order: the hot ones first
    out = [
        Route(f"/v1/{name}", feed_route(name, FEED_ROUTES[name]), methods=["POST"])
        for name in HOT_ROUTES
    ]
    out += [
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/init", init, methods=["POST"]),
        Route("/v1/log_level", put_log_level, methods=["PUT"]),
        Route("/v1/log_level", get_log_level, methods=["GET"]),
        Route("/v1/metadata", metadata, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    for name, handler in FEED_ROUTES.items():
        if name in HOT_ROUTES:
            continue
        out.append(Route(f"/v1/{name}", feed_route(name, handler, creation=name == "external_segment_creation"),
                         methods=["POST"]))
    for legacy, name in LEGACY_PATHS.items():
        out.append(Route(f"/v1/{legacy}", feed_route(name, FEED_ROUTES[name]), methods=["POST"]))
    return out


def create_app(settings: ServiceSettings | None = None, source: ContextSource | None = None) -> hotpath.HotRoutes:
    settings = settings or load_settings()
    logs.configure(settings.log_level, settings.staging_dir)
    guard.configure(settings)
    recent_rows.configure(settings.dedup_seconds, settings.dedup_max_rows)
    snapshot.configure(settings.snapshot_tombstone_days)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The group-commit thread needs the GIL back right after each fsync; with the default 5 ms switch interval it
        # waits behind the busy event loop and every acknowledgement waits with it.
        sys.setswitchinterval(0.0002)
        plugin = Plugin(settings, source)
        app.state.plugin = plugin
        ledger.configure(settings.ledger_retention_days)
        await run_in_threadpool(shared.configure, settings.staging_dir, settings)  # FILEFEED_DATABASE_URL
        await run_in_threadpool(ledger.migrate_on_start, settings.staging_dir)  # old published/ folders, once
        await run_in_threadpool(plugin.staging.recover)
        metrics.start_gauges(plugin.staging, settings.metrics_refresh_seconds)
        plugin.tasks = [
            asyncio.create_task(plugin.staging.run_sealer(), name="sealer"),
            asyncio.create_task(scheduler.run_age_flushes(plugin.staging, plugin.source, settings,
                                                                plugin.lanes), name="flusher"),
            asyncio.create_task(logs.follow_level(settings.staging_dir), name="log-level"),
            asyncio.create_task(metrics.run_flusher(), name="metrics-flush"),
        ]
        server.settle_gc()
        log.info("filefeed %s ready (%s mode, staging %s, writer %s)", __version__,
                 "embedded" if settings.embedded else "gateway", settings.staging_dir, plugin.staging.writer_id)
        try:
            yield
        finally:
            for t in plugin.tasks:
                t.cancel()
            await asyncio.gather(*plugin.tasks, return_exceptions=True)
            plugin.lanes.shutdown()
            await run_in_threadpool(metrics.stop_gauges, plugin.staging)
            await plugin.staging.aclose()
            await plugin.source.aclose()
            await run_in_threadpool(shared.forget, settings.staging_dir)

    app = Starlette(routes=routes(), lifespan=lifespan)
    return hotpath.HotRoutes(app, {f"/v1/{name}": feed_endpoint(name, FEED_ROUTES[name]) for name in HOT_ROUTES})
