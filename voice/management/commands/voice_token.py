"""`manage.py voice_token USER`: print a signed access JWT (demos, support, load tests)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from voice.services.auth import issue_access_token


class Command(BaseCommand):
    help = (
        "Print a signed access JWT for USER (the JWT user_id claim), in the format the main application "
        "issues. Only the token is printed on stdout, so it can be captured: TOKEN=$(manage.py voice_token "
        "u1). Treat it as a secret."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        parser.add_argument("user", help="The user_id claim (VoiceProfile.external_id).")
        parser.add_argument("--plan", default=None, help="The plan claim, e.g. elite (default: none, the "
                                                           "plan stored on the local profile applies).")
        parser.add_argument("--minutes", type=int, default=60, help="Lifetime in minutes (default 60).")
        parser.add_argument("--email", default="", help="The email claim.")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        user = options["user"].strip()
        if not user:
            raise CommandError("USER must not be empty")
        if not 1 <= options["minutes"] <= 60 * 24 * 30:
            raise CommandError("--minutes must be between 1 and 43200 (30 days)")
        token = issue_access_token(
            user_id=user, plan=options["plan"], email=options["email"], minutes=options["minutes"]
        )
        self.stdout.write(token)
