"""Bounded retries with exponential backoff and full jitter, for TransientError only.

Sinks classify their errors once, at their edge; this helper never inspects anything but `SinkError.transient`, so a
TerminalError (bad credentials, host key mismatch, name conflict) fails on the first attempt.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from sinks.base import TransientError

T = TypeVar("T")


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    max_seconds: float = 60.0,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `fn` until it returns, retrying TransientError at most `attempts` times in all and within `max_seconds`.

    Delay before retry n (0-based) is uniform in [0, min(max_delay, base_delay * 2**n)] ("full jitter": many
    feeds failing together do not retry in lock-step). A retry whose delay would overrun `max_seconds` is not
    attempted: the last TransientError is raised instead, so the total time stays bounded.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    start = clock()
    for attempt in range(attempts):
        try:
            return fn()
        except TransientError:
            if attempt == attempts - 1:
                raise
            delay = random.uniform(0.0, min(max_delay, base_delay * (2**attempt)))
            if clock() - start + delay > max_seconds:
                raise
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
