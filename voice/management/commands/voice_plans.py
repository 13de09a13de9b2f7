"""`manage.py voice_plans`: list the plans (with this month's spend) or change one (`--set PLAN ...`)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from voice.selectors import plans_with_month_spend
from voice.services.plans import KEEP, PlanNotFound, plan_update
from voice.services.stats import format_table

NONE_WORDS = ("none", "default", "-", "")
CHANGE_OPTIONS = ("name", "voice", "sessions_per_hour", "max_seconds", "budget", "subscribers", "model",
                  "transcription_model", "voice_name", "vad", "eagerness")
# --option → PlanAccess text field; 'default' (or 'none') clears it: the environment default applies.
TEXT_OPTIONS = (("model", "realtime_model"), ("transcription_model", "transcription_model"),
                ("voice_name", "voice"), ("vad", "vad_type"), ("eagerness", "vad_eagerness"))


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in NONE_WORDS:
        return None
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _optional_money(text: str) -> Decimal | None:
    if text.strip().lower() in NONE_WORDS:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise ValueError("not a number") from exc
    if value < 0:
        raise ValueError("must not be negative")
    return value


class Command(BaseCommand):
    help = (
        "List the subscription plans with their voice limits and this month's spend, or change one with "
        "--set PLAN. Numeric options accept 'none' to clear the value (the global default applies; no "
        "budget cap; unknown subscribers). Unknown plans are an error unless --create is given. Changes "
        "are audited and reach every instance within a second."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        parser.add_argument("--set", metavar="PLAN", help="The plan code to change, e.g. elite.")
        parser.add_argument("--create", action="store_true", help="With --set: create the plan if unknown.")
        parser.add_argument("--name", help="Display name.")
        parser.add_argument("--voice", choices=("on", "off"), help="Whether the plan includes voice.")
        parser.add_argument("--sessions-per-hour", metavar="N", help="Hourly sessions per user ('none').")
        parser.add_argument("--max-seconds", metavar="N", help="Max session duration ('none': default).")
        parser.add_argument("--budget", metavar="USD", help="Monthly budget in USD ('none': no cap).")
        parser.add_argument("--subscribers", metavar="N", help="Active subscribers (adoption KPI base).")
        parser.add_argument("--model", help="Realtime model, e.g. gpt-realtime-mini ('default': "
                                            "OPENAI_REALTIME_MODEL); it needs a price row.")
        parser.add_argument("--transcription-model", help="Input transcription model ('default').")
        parser.add_argument("--voice-name", help="Output voice, e.g. marin ('default': VOICE_NAME).")
        parser.add_argument("--vad", help="server_vad or semantic_vad ('default': VOICE_VAD_TYPE).")
        parser.add_argument("--eagerness", help="semantic_vad eagerness: auto, low, medium, high ('default').")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        if options["set"]:
            self._set(options)
        elif options["create"] or any(options[k] is not None for k in CHANGE_OPTIONS):
            raise CommandError("use --set PLAN to change a plan")
        self._list()

    def _set(self, options: dict[str, Any]) -> None:
        values: dict[str, Any] = {}
        try:
            values["name"] = options["name"] if options["name"] is not None else KEEP
            values["voice_enabled"] = KEEP if options["voice"] is None else options["voice"] == "on"
            for option, field, parse in (
                ("sessions_per_hour", "sessions_per_hour", _optional_int),
                ("max_seconds", "max_session_seconds", _optional_int),
                ("budget", "monthly_budget_usd", _optional_money),
                ("subscribers", "active_subscribers", _optional_int),
            ):
                values[field] = KEEP if options[option] is None else parse(options[option])
            for option, field in TEXT_OPTIONS:
                text = options[option]
                values[field] = KEEP if text is None else "" if text.strip().lower() in NONE_WORDS else text.strip()
        except ValueError as exc:
            raise CommandError(f"invalid value: {exc}") from exc
        try:
            plan, changes = plan_update(
                code=options["set"], actor_id=None, create=options["create"], **values
            )
        except PlanNotFound as exc:
            raise CommandError(f"unknown plan {options['set']!r} (use --create to add it)") from exc
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        if changes:
            self.stdout.write(self.style.SUCCESS(f"Plan {plan.code} updated: {', '.join(changes)}."))
        else:
            self.stdout.write(f"Plan {plan.code} unchanged.")

    def _list(self) -> None:
        rows = [("PLAN", "NAME", "VOICE", "MODEL", "SESSIONS/H", "MAX S", "BUDGET USD", "SUBSCRIBERS",
                 "MONTH SPEND")]
        for plan in plans_with_month_spend().order_by("code"):
            rows.append((
                plan.code, plan.name, "on" if plan.voice_enabled else "off", plan.realtime_model or "default",
                str(plan.sessions_per_hour or "default"), str(plan.max_session_seconds or "default"),
                "none" if plan.monthly_budget_usd is None else f"{plan.monthly_budget_usd:.2f}",
                "unknown" if plan.active_subscribers is None else str(plan.active_subscribers),
                f"{plan.month_spend:.4f}",
            ))
        self.stdout.write(format_table(rows))
