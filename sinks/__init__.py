"""Destinations by URL scheme: `open_sink(props)` returns the Sink for `props.destination_uri`.

Backends are imported lazily, on first use of their scheme, so a feed writing to a local folder never needs boto3,
paramiko or google-cloud-storage installed; a missing one becomes a TerminalError carrying the pip command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

from sinks.base import (
    PublishResult,
    RemoteObject,
    Sink,
    SinkError,
    TerminalError,
    TransientError,
    check_name,
)

if TYPE_CHECKING:
    from config.feed import FeedProperties

__all__ = [
    "PublishResult",
    "RemoteObject",
    "Sink",
    "SinkError",
    "TerminalError",
    "TransientError",
    "check_name",
    "open_sink",
    "register",
    "sink_class",
]

# scheme -> (module that registers it, pip requirement that module needs)
BACKENDS: dict[str, tuple[str, str]] = {
    "file": ("sinks.local", ""),
    "s3": ("sinks.s3", "boto3"),
    "sftp": ("sinks.sftp", "paramiko"),
    "gs": ("sinks.gcs", "google-cloud-storage"),
}

_REGISTRY: dict[str, type[Sink]] = {}

S = TypeVar("S", bound=type[Sink])


def register(cls: S) -> S:
    """Class decorator: make `cls` the sink for `cls.scheme`."""
    scheme = getattr(cls, "scheme", None)
    if not scheme:
        raise TypeError(f"{cls.__name__} has no 'scheme'")
    _REGISTRY[scheme] = cls
    return cls


def sink_class(scheme: str) -> type[Sink]:
    """The Sink class for `scheme`, importing its backend module on first use."""
    if scheme not in _REGISTRY:
        if scheme not in BACKENDS:
            raise TerminalError(f"no sink for scheme '{scheme}' (known: {', '.join(sorted(BACKENDS))})", kind="config")
        module, requirement = BACKENDS[scheme]
        try:
            importlib.import_module(module)
        except ImportError as e:
            # Only a missing third-party package deserves the hint; a broken import inside our module must show.
            missing = getattr(e, "name", None) or ""
            if missing.startswith("sinks") or not requirement:
                raise
            raise TerminalError(
                f"{scheme}:// destinations need the '{requirement}' package (missing module '{missing}'): "
                f"pip install '{requirement}'",
                kind="dependency",
            ) from e
        if scheme not in _REGISTRY:
            raise TerminalError(f"module {module} did not register a sink for '{scheme}'", kind="config")
    return _REGISTRY[scheme]


def open_sink(props: FeedProperties) -> Sink:
    """The Sink for `props.destination_uri` (connections are opened lazily, on first use)."""
    return sink_class(props.destination.scheme)(props)
