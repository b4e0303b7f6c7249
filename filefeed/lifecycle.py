"""Feed lifecycle handlers: creation/connection checks, credential tests, and the OAuth routes file feeds don't use."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from config.feed import COMPRESSIONS, FeedConfigError, FeedProperties, parse_feed_properties
from config.settings import ServiceSettings
from filefeed.context import FeedContext
from pipeline.lanes import LaneFull, Lanes, destination_key
from sinks import SinkError, TerminalError, open_sink


def _check(props: FeedProperties) -> None:
    with open_sink(props) as sink:
        sink.check()


def check_destination(ctx: FeedContext, settings: ServiceSettings, creation: bool) -> dict[str, Any]:
    """Validate the properties, then write and remove a probe object at the destination.

    Messages name the property and the problem so a marketer can act; they never carry a secret.
    """
    ignored = f" (ignored: {'; '.join(ctx.warnings)})" if ctx.warnings else ""
    if ctx.props is None:
        assert ctx.error is not None
        return {"status": "error", "visibility": "PUBLIC", "message": f"Invalid feed properties: {ctx.error}{ignored}"}
    try:
        _check(ctx.props)
    except SinkError as e:
        what = "cannot be written to" if not e.transient else "is not reachable right now"
        return {"status": "error", "visibility": "PUBLIC",
                "message": f"destination_uri {ctx.props.destination} {what} ({e.kind}): {e}{ignored}"}
    if ctx.warnings:
        return {"status": "ok", "visibility": "PUBLIC", "message": f"Feed created; {'; '.join(ctx.warnings)}: "
                "ignored (a property of another version of this plugin, or a typo)"}
    return {"status": "ok", "visibility": "PUBLIC"}


async def check_destination_within(destination_lanes: Lanes, ctx: FeedContext, settings: ServiceSettings,
                                   creation: bool) -> dict[str, Any]:
    """check_destination on the destination's lane, answered within `batch_deadline_seconds`: a stuck partner takes
    neither the routes' shared threads nor longer than that."""
    if ctx.props is None:
        return check_destination(ctx, settings, creation)
    where = f"destination_uri {ctx.props.destination}"
    try:
        return await destination_lanes.run(destination_key(ctx.props), settings.batch_deadline_seconds,
                                           check_destination, ctx, settings, creation)
    except LaneFull:
        return {"status": "error", "visibility": "PUBLIC",
                "message": f"{where} is not reachable right now (busy): too many calls wait for it"}
    except TimeoutError:
        return {"status": "error", "visibility": "PUBLIC", "message": f"{where} is not reachable right now "
                f"(timeout): no answer within {settings.batch_deadline_seconds:g} s"}


def test_credentials(ctx: FeedContext | None, credentials: dict[str, Any] | None,
                     settings: ServiceSettings) -> dict[str, Any]:
    """Check destination credentials against the destination: ok, invalid_credentials (401) or error.

    The destination comes from the feed's properties when the request names a feed_id (an extension of the
    protocol), overridden by the credentials' keys that are property names; or from the credentials alone.
    """
    raw: dict[str, Any] = dict(ctx.raw_properties) if ctx is not None else {}
    raw.update({k: v for k, v in (credentials or {}).items() if k in FeedProperties.model_fields})
    if "destination_uri" not in raw:
        return {"status": "not_implemented",
                "message": "no destination to test: credentials must carry destination_uri, or name a feed_id"}
    try:
        props = parse_feed_properties(raw)
    except FeedConfigError as e:
        return {"status": "error", "message": f"Invalid properties: {e}"}
    try:
        _check(props)
    except TerminalError as e:
        if e.kind in ("auth", "host_key", "permission"):
            return {"status": "invalid_credentials", "message": str(e)}
        return {"status": "error", "message": str(e)}
    except SinkError as e:
        return {"status": "error", "message": str(e)}
    return {"status": "ok"}


def oauth_not_used() -> dict[str, Any]:
    # File destinations authenticate with keys and passwords (feed properties or destination credentials), not OAuth.
    # An OAuth-based destination would implement authentication / logout / authentication_status_queries here.
    return {"status": "not_implemented", "message": "file destinations use credentials, not OAuth"}


_LABELS = {"csv": "CSV", "parquet": "Parquet", "gzip": "gzip", "zstd": "Zstandard", "snappy": "Snappy",
           "none": "None"}


def dynamic_property_values() -> dict[str, Any]:
    compressions = sorted({c for cs in COMPRESSIONS.values() for c in cs})
    return {
        "status": "ok",
        "data": [
            {"property_technical_name": "file_format",
             "enum": [{"label": _LABELS[f], "value": f} for f in COMPRESSIONS]},
            {"property_technical_name": "compression",
             "enum": [{"label": _LABELS[c], "value": c} for c in compressions]},
        ],
    }


def dependency_versions(version: str) -> dict[str, str]:
    out = {"filefeed": version}
    for dist in ("starlette", "uvicorn", "pyarrow", "boto3", "paramiko", "google-cloud-storage", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
