"""`manage.py voice_reset_ratelimit USER`: clear a user's hourly session window (support requests)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from voice.models import VoiceProfile
from voice.services.plans import RateLimitResetError, rate_limit_items, rate_limit_reset
from voice.services.stats import run_with_state
from voice.services.users import find_user


class Command(BaseCommand):
    help = (
        "Clear USER's hourly voice-session window (the moving window shared through Redis) so they can "
        "start sessions again at once. USER is a JWT user_id or a local username. Instances serving from "
        "the in-memory fallback during a Redis outage keep their own window until Redis is back."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        parser.add_argument("user", help="JWT user_id (VoiceProfile.external_id) or username.")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        reference = options["user"].strip()
        if not reference:
            raise CommandError("USER must not be empty")
        user = find_user(reference)
        profile = VoiceProfile.objects.filter(user=user).first() if user is not None else None
        external_id = profile.external_id if profile is not None else reference
        items = rate_limit_items()
        try:
            found = run_with_state(lambda state: rate_limit_reset(state, external_id, items))
        except RateLimitResetError as exc:
            raise CommandError(f"Redis unreachable ({exc}); nothing was cleared") from exc
        self.stdout.write(self.style.SUCCESS(
            f"Hourly session window cleared for {external_id} ({found} window key(s) removed)."))
