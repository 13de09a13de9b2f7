"""`manage.py voice_sessions`: list recent or live sessions, terminate one, replay the metrics spool."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from voice.models import VoiceSession
from voice.services.rollout import broadcast_terminate
from voice.services.sessions import flush_spool
from voice.services.stats import format_table, live_session_ids_sync, session_rows


class Command(BaseCommand):
    help = (
        "List the most recent voice sessions (--active: the live ones on every instance), terminate a live "
        "session (--terminate ID: the client gets `terminated` and close code 4010), or replay metrics "
        "records spooled while the database was unavailable (--flush-spool)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--active", action="store_true", help="List live sessions only.")
        action.add_argument("--terminate", metavar="ID", help="Terminate a live session by id.")
        action.add_argument("--flush-spool", action="store_true", help="Replay spooled session records.")
        parser.add_argument("--limit", type=int, default=20, help="How many recent sessions (default 20).")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        if options["terminate"]:
            self._terminate(options["terminate"].strip())
        elif options["flush_spool"]:
            try:
                count = flush_spool()
            except (DatabaseError, OSError, ValueError, KeyError) as exc:
                raise CommandError(f"spool replay failed ({type(exc).__name__}); records kept") from exc
            self.stdout.write(self.style.SUCCESS(f"{count} spooled record(s) replayed."))
        elif options["active"]:
            live = live_session_ids_sync()
            rows = {str(row.id): row for row in session_rows(ids=live)}
            self.stdout.write(f"{len(live)} live session(s)")
            if live:
                self.stdout.write(self._table([rows.get(sid) or sid for sid in live]))
        else:
            sessions = session_rows(limit=max(1, options["limit"]))
            self.stdout.write(self._table(sessions) if sessions else "No session recorded.")

    def _terminate(self, session_id: str) -> None:
        live = live_session_ids_sync()
        known = VoiceSession.objects.filter(pk=session_id).exists() if _is_uuid(session_id) else False
        if session_id not in live and not known:
            raise CommandError(f"unknown session {session_id!r}")
        if session_id not in live:
            self.stdout.write(self.style.WARNING("The session is not live; sending the termination anyway."))
        if not broadcast_terminate(code="terminated", session_id=session_id):
            raise CommandError("the channel layer is unavailable (Redis down?); the session was not reached")
        self.stdout.write(self.style.SUCCESS(f"Termination sent to session {session_id}."))

    @staticmethod
    def _table(sessions: list) -> str:
        rows = [("ID", "USER", "PLAN", "COHORT", "STARTED", "DURATION S", "END", "TURNS", "COST USD")]
        for session in sessions:
            if isinstance(session, str):
                rows.append((session, "?", "", "", "", "", "live", "", ""))
                continue
            rows.append((
                str(session.id), session.external_user_id, session.plan, session.cohort or "-",
                f"{session.started_at:%Y-%m-%d %H:%M:%S}", f"{session.duration_s:.0f}",
                session.end_reason or "live/open", str(session.turns), f"{session.cost_usd:.4f}",
            ))
        return format_table(rows)


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
