"""Serve the gateway with uvicorn (production settings, graceful drain on SIGTERM)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from voice.server import VoiceServer, server_config


class Command(BaseCommand):
    help = "Serve Intelia Voice (HTTP + WebSocket) with uvicorn; SIGTERM drains live voice sessions."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--uds", default=None, help="Unix domain socket path instead of host/port.")
        parser.add_argument("--no-access-log", action="store_true")
        parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
        parser.add_argument("--ws", default="voice", choices=["voice", "websockets-sansio", "websockets", "wsproto"],
                            help="WebSocket protocol: voice (fast path, default) or one of uvicorn's own.")

    def handle(self, *args, **options) -> None:
        config = server_config(
            host=options["host"], port=options["port"], uds=options["uds"],
            access_log=not options["no_access_log"], loop=options["loop"], ws=options["ws"],
        )
        VoiceServer(config).run()
