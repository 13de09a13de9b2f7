"""`manage.py realtime_engine`: run the local OpenAI-Realtime-compatible engine as a WebSocket server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from voice.realtime.engine import EngineConfig
from voice.realtime.engine.server import serve


class Command(BaseCommand):
    """Serve ws://HOST:PORT/v1/realtime with the local engine (offline development and benchmarks)."""

    help = (
        "Run the local realtime engine: an in-process implementation of the OpenAI Realtime GA protocol "
        "over WebSocket (ws://HOST:PORT/v1/realtime?model=..., any non-empty Bearer token). Defaults come "
        "from the LOCAL_ENGINE_* settings."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        """Called by Django to declare the command's options."""
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 = any)")
        parser.add_argument("--first-audio-ms", type=int, default=None,
                            help="delay from response.create to the first audio delta")  # fmt: skip
        parser.add_argument("--transcript-delay-ms", type=int, default=None,
                            help="delay from commit to the input transcription")  # fmt: skip
        parser.add_argument("--speed", type=float, default=None,
                            help="stream response audio at N x real time (<= 0: unpaced)")  # fmt: skip
        parser.add_argument("--script", default=None,
                            help="JSON file: list of transcripts for successive spoken turns")  # fmt: skip
        parser.add_argument("--tts", choices=("auto", "espeak", "tone"), default=None,
                            help="response audio: espeak-ng when installed, else a tone")  # fmt: skip
        parser.add_argument("--test-hooks", action="store_true",
                            help="honour the engine.test_hook client event (fault injection)")  # fmt: skip

    def handle(self, *args: Any, **opts: Any) -> None:
        """Called by Django with the parsed options; runs until Ctrl-C."""
        config = EngineConfig(test_hooks=opts["test_hooks"])
        for name in ("first_audio_ms", "transcript_delay_ms", "speed", "script", "tts"):
            if opts[name] is not None:
                setattr(config, name, opts[name])
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.stdout.write(f"local realtime engine on ws://{opts['host']}:{opts['port']}/v1/realtime")
        try:  # uvloop when installed, as the gateway: the engine serves every session of a bench
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(opts["host"], opts["port"], config))
