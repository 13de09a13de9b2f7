"""`manage.py voice_cleanup --older-than DAYS [--dry-run]`: delete old session metrics and refusals."""

from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from voice.models import AccessRefusal, VoiceSession, VoiceTurn


class Command(BaseCommand):
    help = (
        "Delete voice sessions (with their turns) started more than DAYS days ago, and access refusals "
        "older than DAYS days. --dry-run only counts. Run it from cron to bound the metrics tables."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        parser.add_argument("--older-than", type=int, required=True, metavar="DAYS",
                            help="Age in days (at least 1).")
        parser.add_argument("--dry-run", action="store_true", help="Only count what would be deleted.")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        days = options["older_than"]
        if days < 1:
            raise CommandError("--older-than must be at least 1 day")
        cutoff = timezone.now() - timedelta(days=days)
        sessions = VoiceSession.objects.filter(started_at__lt=cutoff)
        refusals = AccessRefusal.objects.filter(at__lt=cutoff)
        counts = (sessions.count(), VoiceTurn.objects.filter(session__in=sessions).count(), refusals.count())
        summary = (f"{counts[0]} session(s), {counts[1]} turn(s), {counts[2]} refusal(s) "
                   f"older than {cutoff:%Y-%m-%d %H:%M} UTC")
        if options["dry_run"]:
            self.stdout.write(f"Dry run: would delete {summary}.")
            return
        with transaction.atomic():
            sessions.delete()  # turns cascade
            refusals.delete()
        self.stdout.write(self.style.SUCCESS(f"Deleted {summary}."))
