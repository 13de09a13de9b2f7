"""Full garbage collections: never by CPython's own trigger while a server runs; when idle, or at the latest
after VOICE_GC_FULL_MAX_SECONDS (voice/gc_policy.py)."""

from __future__ import annotations

import asyncio
import gc

from voice.gc_policy import FULL_COLLECTIONS_OFF, FullCollectionPolicy


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _promote_to_the_old_generation() -> None:
    """Objects that survive two young collections (as a new session's do) reach generation 2."""
    keep = [_Cycle() for _ in range(100)]
    gc.collect(0)
    gc.collect(1)
    del keep


async def test_cpython_never_starts_a_full_collection_and_the_policy_collects_when_idle() -> None:
    before = gc.get_threshold()
    policy = FullCollectionPolicy(max_interval_seconds=600).start()
    try:
        assert gc.get_threshold() == (before[0], before[1], FULL_COLLECTIONS_OFF)
        gc.collect()
        assert not policy.due(now=policy.last_full + 601, sessions_live=False)  # nothing new to walk
        _promote_to_the_old_generation()
        assert gc.get_count()[2] >= 1
        assert not policy.due(now=policy.last_full + 1, sessions_live=True)  # sessions live: wait
        assert policy.due(now=policy.last_full + 600, sessions_live=True)  # the longest interval passed
        assert policy.due(now=policy.last_full + 1, sessions_live=False)  # nobody listening
        for _ in range(30):  # no live session in this test: the policy's own task collects within ~1 s
            if policy.full_collections:
                break
            await asyncio.sleep(0.1)
        assert policy.full_collections == 1
    finally:
        policy.stop()
    assert gc.get_threshold() == before


async def test_zero_leaves_cpythons_policy() -> None:
    before = gc.get_threshold()
    policy = FullCollectionPolicy(max_interval_seconds=0).start()
    assert gc.get_threshold() == before
    policy.stop()
