"""Instance context per feed: the feed resource and its validated properties, from the gateway or an embedded TOML.

Gateway mode mirrors the official SDK: Basic auth (worker id / token), the `{"status","data"}` envelope unwrapped,
404 as a distinct "not found", a per-feed cache of 10 minutes plus up to 10 % jitter that shares an in-flight build,
never caches a failure, and is rebuilt on external_segment_creation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from config.feed import FeedConfigError, FeedProperties, parse_feed_properties, property_values, unknown_properties
from config.problems import ConfigFileError, read_toml
from config.settings import ServiceSettings
from pipeline.identifiers import IdentifierRules
from pipeline.transforms import email_transform

log = logging.getLogger("filefeed.context")
FEEDS_ENV = "FILEFEED_FEEDS"


class GatewayError(Exception):
    """The gateway failed or answered something unusable (message names the call, never the credentials)."""


class NotFound(GatewayError):
    pass


@dataclass
class FeedContext:
    feed_id: str
    feed: dict[str, Any]
    raw_properties: dict[str, Any]
    props: FeedProperties | None
    error: FeedConfigError | None
    rules: IdentifierRules | None
    built_at: float = field(default_factory=time.monotonic)
    warnings: list[str] = field(default_factory=list)  # properties ignored (gateway mode: other plugin versions)

    @property
    def valid(self) -> bool:
        return self.props is not None


def build_context(feed_id: str, feed: dict[str, Any], raw: dict[str, Any],
                  credentials: dict[str, Any] | None = None, *, strict: bool = False) -> FeedContext:
    """Validate the properties (credentials whose keys are property names override them). `strict` (embedded
    mode): an unknown property is an error; else a warning, logged and kept on the context."""
    merged = dict(raw)
    if credentials:
        merged.update({k: v for k, v in credentials.items() if k in FeedProperties.model_fields})
    warnings = [] if strict else unknown_properties(merged)
    for w in warnings:
        log.warning("feed %s: %s, ignored", feed_id, w, extra={"feed_id": feed_id})
    try:
        props = parse_feed_properties(merged, strict=strict)
    except FeedConfigError as e:
        return FeedContext(feed_id, feed, raw, None, e, None, warnings=warnings)
    rules = IdentifierRules(props.identifier_selectors(feed.get("selected_identifying_resources")),
                            email_transform(props.email_hashing, props.email_normalization))
    return FeedContext(feed_id, feed, raw, props, None, rules, warnings=warnings)


class GatewayClient:
    def __init__(self, settings: ServiceSettings, transport: httpx.AsyncBaseTransport | None = None):
        token = settings.plugin_authentication_token.get_secret_value() if settings.plugin_authentication_token else ""
        self._client = httpx.AsyncClient(
            base_url=settings.gateway_url,
            auth=httpx.BasicAuth(settings.plugin_worker_id or "", token),
            timeout=settings.gateway_timeout_seconds,
            transport=transport,
            trust_env=False,  # no proxy: the SDK calls the gateway directly
        )

    async def get(self, path: str) -> Any:
        try:
            r = await self._client.get(path)
        except httpx.HTTPError as e:
            raise GatewayError(f"GET {path} failed: {type(e).__name__}") from None
        if r.status_code == 404:
            raise NotFound(f"GET {path}: not found")
        if r.status_code >= 300:
            raise GatewayError(f"GET {path}: HTTP {r.status_code}")
        try:
            body = r.json()
        except ValueError:
            raise GatewayError(f"GET {path}: not JSON") from None
        if not isinstance(body, dict) or body.get("status") != "ok" or "data" not in body:
            raise GatewayError(f"GET {path}: unexpected envelope")
        return body["data"]

    async def aclose(self) -> None:
        await self._client.aclose()


class _TTLCache:
    """Per-key cache of pending builds: concurrent callers share one build; failures are evicted, never cached."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._entries: dict[str, tuple[float, asyncio.Future]] = {}

    def jittered_ttl(self) -> float:
        return self.ttl * (1 + 0.1 * random.random())

    async def get(self, key: str, build: Callable[[], Awaitable[Any]], force: bool = False) -> Any:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry and not force and entry[0] > now:
            return await asyncio.shield(entry[1])
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._entries[key] = (now + self.jittered_ttl(), fut)
        try:
            value = await build()
        except BaseException as e:
            if self._entries.get(key, (0, None))[1] is fut:
                del self._entries[key]
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters get it through shield
            raise
        fut.set_result(value)
        return value

    def peek(self, key: str) -> Any:
        """The value already built for `key` and not expired, else None (nothing waits, nothing is built)."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        fut = entry[1]
        if not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    def clear(self) -> None:
        self._entries.clear()


class ContextSource:
    """Where feed contexts come from; subclasses: gateway or embedded TOML."""

    embedded: bool = False

    async def feed_context(self, feed_id: str, *, force: bool = False) -> FeedContext:
        raise NotImplementedError

    def cached(self, feed_id: str) -> FeedContext | None:
        """The feed's context when it is at hand without waiting (built and not expired), else None."""
        return None

    async def credentials(self, feed_destination_id: str | None) -> dict[str, Any] | None:
        return None

    async def aclose(self) -> None:
        return None


class GatewayContextSource(ContextSource):
    def __init__(self, settings: ServiceSettings, transport: httpx.AsyncBaseTransport | None = None):
        self.gateway = GatewayClient(settings, transport)
        self.contexts = _TTLCache(settings.context_ttl_seconds)
        self.creds = _TTLCache(settings.context_ttl_seconds)

    async def feed_context(self, feed_id: str, *, force: bool = False) -> FeedContext:
        async def build() -> FeedContext:
            feed, props = await asyncio.gather(
                self.gateway.get(f"/v1/audience_segment_external_feeds/{feed_id}"),
                self.gateway.get(f"/v1/audience_segment_external_feeds/{feed_id}/properties"),
            )
            if not isinstance(feed, dict) or not isinstance(props, list):
                raise GatewayError("feed or properties: unexpected shape")
            return build_context(feed_id, feed, property_values(props))

        return await self.contexts.get(feed_id, build, force=force)

    def cached(self, feed_id: str) -> FeedContext | None:
        return self.contexts.peek(feed_id)

    async def credentials(self, feed_destination_id: str | None) -> dict[str, Any] | None:
        if not feed_destination_id:
            return None

        async def build() -> dict[str, Any] | None:
            try:
                data = await self.gateway.get(f"/v1/feed_destinations/{feed_destination_id}/credentials")
            except NotFound:
                return None  # the SDK caches a 404 as None: the plugin falls back to its own credentials
            creds = data.get("credentials") if isinstance(data, dict) else None
            return creds if isinstance(creds, dict) else None

        return await self.creds.get(f"feed_destination_credentials:{feed_destination_id}", build)

    async def aclose(self) -> None:
        await self.gateway.aclose()


def load_embedded_feeds(path: Path) -> dict[str, dict[str, Any]]:
    """Read `[feeds.<id>]` tables; a relative `file:` destination is resolved against the current directory.
    ConfigFileError (one line: file, line, what to do) for a file that cannot be used."""
    doc = read_toml(path, FEEDS_ENV)
    feeds = doc.get("feeds")
    if not isinstance(feeds, dict) or not feeds:
        raise ConfigFileError(f"{FEEDS_ENV}={path}: no [feeds.<id>] table (declare at least one feed, as in "
                              "config/feeds.toml)")
    others = sorted(k for k in doc if k != "feeds")
    if others:
        raise ConfigFileError(f"{FEEDS_ENV}={path}: unknown top-level key(s) {', '.join(others)}; feeds go in "
                              "[feeds.<id>] tables")
    out: dict[str, dict[str, Any]] = {}
    for feed_id, table in feeds.items():
        if not isinstance(table, dict):
            raise ConfigFileError(f"{FEEDS_ENV}={path}: [feeds.{feed_id}] must be a table of properties")
        table = dict(table)
        uri = table.get("destination_uri")
        if isinstance(uri, str) and uri.startswith("file:") and not uri.startswith("file:/"):
            table["destination_uri"] = Path(uri[len("file:"):]).resolve().as_uri()
        out[str(feed_id)] = table
    return out


class EmbeddedContextSource(ContextSource):
    embedded = True

    def __init__(self, path: Path):
        self.path = path
        self.feeds = load_embedded_feeds(path)
        self._built: dict[str, FeedContext] = {}

    async def feed_context(self, feed_id: str, *, force: bool = False) -> FeedContext:
        if not force and feed_id in self._built:
            return self._built[feed_id]
        if force:
            self.feeds = load_embedded_feeds(self.path)  # creation re-reads the file, like the gateway's forced rebuild
        return self._build(feed_id)

    def cached(self, feed_id: str) -> FeedContext | None:
        return self._built.get(feed_id)

    def _build(self, feed_id: str) -> FeedContext:
        table = self.feeds.get(feed_id)
        if table is None:
            raise NotFound(f"feed {feed_id} is not declared in {self.path.name}")
        raw = {k: v for k, v in table.items() if k != "selected_identifying_resources"}
        feed = {"id": feed_id, "selected_identifying_resources": table.get("selected_identifying_resources", [])}
        ctx = self._built[feed_id] = build_context(feed_id, feed, raw, strict=True)
        return ctx

    def check_all(self) -> dict[str, FeedContext]:
        """Every declared feed built once (at start-up: a broken feed is told before any call for it)."""
        return {feed_id: self._build(feed_id) for feed_id in self.feeds}


def context_source(settings: ServiceSettings) -> ContextSource:
    if settings.embedded:
        assert settings.feeds is not None
        return EmbeddedContextSource(settings.feeds)
    return GatewayContextSource(settings)
