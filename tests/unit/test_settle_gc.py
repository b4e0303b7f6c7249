"""Workers settle the cyclic GC once started: start-up objects frozen, a larger youngest generation."""

from __future__ import annotations

import gc

from filefeed import server


def test_settle_gc_freezes_what_is_loaded_and_raises_the_gen0_threshold() -> None:
    before = gc.get_threshold()
    try:
        server.settle_gc()
        assert gc.get_threshold() == (server.GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
        kept = [[] for _ in range(10)]  # made after the freeze: still tracked, still collectable
        assert all(gc.is_tracked(x) for x in kept)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
