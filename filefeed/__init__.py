"""filefeed: a mediarithmics Audience Segment External Feed plugin that delivers segments as files."""

__version__ = "0.1.0"
