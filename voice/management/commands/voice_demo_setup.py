"""Seed the demo user (Elite plan, on the beta list) and print a ready-to-use demo URL and dev token."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from voice.models import BetaUser, PlanAccess, VoiceRollout
from voice.services.auth import issue_access_token
from voice.services.users import user_for_identity

DEMO_USER = "demo-user"


def demo_url(base: str, token: str) -> str:
    """The demo page URL carrying `token` in its fragment, which demo.js reads and then removes."""
    return f"{base}/voice/demo/#token={token}"


class Command(BaseCommand):
    help = "Create the demo user on the Elite plan (beta list) and print the demo URL and a dev token."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--minutes", type=int, default=12 * 60)

    def handle(self, *args, **options) -> None:
        user = user_for_identity(external_id=DEMO_USER, email="demo@example.com")
        elite = PlanAccess.objects.get(code="elite")
        from voice.models import VoiceProfile

        VoiceProfile.objects.filter(user_id=user.pk).update(plan=elite)
        rollout, _ = VoiceRollout.objects.get_or_create(pk=1)
        BetaUser.objects.get_or_create(user_id=user.pk, defaults={"rollout": rollout, "note": "make run demo"})
        token = issue_access_token(user_id=DEMO_USER, plan="elite", minutes=options["minutes"])
        base = f"http://{options['host']}:{options['port']}"
        self.stdout.write("")
        self.stdout.write(self.style.SUCCESS("Intelia Voice is starting."))
        self.stdout.write(f"  upstream:    {settings.VOICE_UPSTREAM} (no OpenAI key: local realtime engine)"
                          if settings.VOICE_UPSTREAM == "local" else f"  upstream:    {settings.VOICE_UPSTREAM}")
        self.stdout.write(f"  health:      {base}/v1/voice/health")
        self.stdout.write(f"  admin:       {base}/admin/  (python manage.py createsuperuser)")
        # The token rides in the URL fragment: browsers never send it, so it stays out of server logs.
        self.stdout.write(f"  demo:        {demo_url(base, token)}")
        self.stdout.write("               (opens signed in as the demo user; or paste the token below)")
        self.stdout.write(f"  WebSocket:   ws://{options['host']}:{options['port']}/v1/ws/voice")
        self.stdout.write(f"  dev token ({DEMO_USER}, elite, {options['minutes']} min):")
        self.stdout.write(f"    {token}")
        self.stdout.write("")
