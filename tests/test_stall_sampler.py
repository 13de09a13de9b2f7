"""The stall sampler names what the event loop ran while it was stuck (voice/observability/stall_sampler.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from voice.observability.stall_sampler import StallSampler
from voice.server import probe_loop_lag, stall_sampler_start


def _spin_in_python(seconds: float) -> None:
    """A stall made of Python bytecode (it gives up the GIL every switch interval, as ORM code would)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(100))


async def test_a_stall_is_logged_with_the_code_that_caused_it(settings, caplog: pytest.LogCaptureFixture) -> None:
    settings.VOICE_STALL_SAMPLER_MS = 30
    sampler = stall_sampler_start()
    assert sampler is not None
    probe = asyncio.get_running_loop().create_task(probe_loop_lag(sampler=sampler))
    try:
        await asyncio.sleep(0.1)  # healthy beats: nothing logged
        assert sampler.stalls_seen == 0
        with caplog.at_level(logging.WARNING, logger="voice.observability.stall_sampler"):
            _spin_in_python(0.15)
            await asyncio.sleep(0.05)  # the probe beats again: the sampler ends the stall and logs it
            for _ in range(50):
                if sampler.stalls_seen:
                    break
                await asyncio.sleep(0.01)
        assert sampler.stalls_seen == 1
        message = caplog.records[-1].getMessage()
        assert "event loop stall of ~" in message and "_spin_in_python" in message, message
    finally:
        probe.cancel()
        sampler.stop()


class _Owner:
    """Stands for an ended session's consumer: what the loop was running when the stall was sampled."""

    def stall(self, sampler: StallSampler) -> None:
        _spin_in_python(0.15)
        sampler.beat()  # the stall ends in this frame: the sampler's last sample was taken in it
        _spin_in_python(0.01)


async def test_a_sampled_stall_keeps_nothing_of_what_the_loop_ran_alive(settings) -> None:
    """The watcher thread lives on between stalls: the frame it sampled last must not (it would keep the
    stalled code's locals, an ended session's consumer say, alive until the next stall)."""
    import gc
    import weakref

    settings.VOICE_STALL_SAMPLER_MS = 30
    sampler = stall_sampler_start()
    assert sampler is not None
    probe = asyncio.get_running_loop().create_task(probe_loop_lag(sampler=sampler))
    gc.disable()  # freed by reference counting alone, or not at all
    try:
        owner = _Owner()
        freed = weakref.ref(owner)
        owner.stall(sampler)
        del owner
        for _ in range(50):
            if sampler.stalls_seen:
                break
            await asyncio.sleep(0.01)
        assert sampler.stalls_seen == 1
        assert freed() is None, "the sampler kept the stalled frame (and its locals) alive"
    finally:
        gc.enable()
        probe.cancel()
        sampler.stop()


def test_the_sampler_is_off_at_zero(settings) -> None:
    settings.VOICE_STALL_SAMPLER_MS = 0
    assert stall_sampler_start() is None

