"""`manage.py voice_rollout`: show or change the rollout (kill switch, percentage, beta list) and check the
KPI gate. Changes are audited (LogEntry, as the `voice-system` user) and reach every instance within 1 s."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from voice.models import BetaUser, VoiceRollout
from voice.services.plans import beta_add, beta_remove, user_ensure
from voice.services.rollout import rollout_update
from voice.services.stats import format_table, kpi_gate, kpi_rows, parse_since
from voice.services.users import find_user


class Command(BaseCommand):
    help = (
        "Show or change the voice rollout. --disable engages the kill switch (live sessions close within "
        "a second on every instance); --enable releases it; --percent N admits N %% of users "
        "(deterministic per user id); --add-beta/--remove-beta USER edit the beta list (USER is a JWT "
        "user_id or a username; an unknown id is created so the list can be prepared before first login; "
        "repeat the option for several users). Changes combine in one call, e.g. "
        "`--enable --percent 10 --add-beta alice`; all are checked before any is applied. "
        "--check evaluates the rollout KPI gate (exit status 1 when it fails)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        switch = parser.add_mutually_exclusive_group()
        switch.add_argument("--enable", action="store_true", help="Release the kill switch.")
        switch.add_argument("--disable", action="store_true",
                            help="Engage the kill switch (closes live sessions).")
        parser.add_argument("--percent", type=int, metavar="N", help="Rollout percentage, 0-100.")
        parser.add_argument("--add-beta", metavar="USER", action="append", default=[],
                            help="Add a user to the beta list (repeatable).")
        parser.add_argument("--remove-beta", metavar="USER", action="append", default=[],
                            help="Remove a user from the beta list (repeatable).")
        parser.add_argument("--show", action="store_true", help="Show the rollout (the default).")
        parser.add_argument("--check", action="store_true", help="Evaluate the KPI gate (no changes with it).")
        parser.add_argument("--since", default="7d", help="KPI window for --check (default 7d; 24h, 2w…).")
        parser.add_argument("--json", action="store_true", help="With --check: print the gate as JSON.")
        parser.add_argument("--note", default="", help="With --add-beta: a note shown in the admin.")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        changes = (options["enable"] or options["disable"] or options["percent"] is not None
                   or options["add_beta"] or options["remove_beta"])
        if options["check"]:
            if changes or options["show"]:
                raise CommandError("--check does not combine with changes or --show")
            self._check(options)
            return
        if options["percent"] is not None and not 0 <= options["percent"] <= 100:
            raise CommandError("--percent must be between 0 and 100")
        removals = self._beta_users_to_remove(options["remove_beta"])
        if options["enable"] or options["disable"]:
            rollout_update(actor_id=None, voice_enabled=bool(options["enable"]))
            self.stdout.write(self.style.SUCCESS(
                "Kill switch released: voice enabled." if options["enable"]
                else "Kill switch ENGAGED: voice disabled, live sessions are being closed."))
        if options["percent"] is not None:
            rollout_update(actor_id=None, percentage=options["percent"])
            self.stdout.write(self.style.SUCCESS(f"Rollout percentage set to {options['percent']} %."))
        for reference in options["add_beta"]:
            user, created = user_ensure(reference)
            added = beta_add(user=user, actor_id=None, note=options["note"])
            suffix = " (new local user created)" if created else ""
            message = "added to" if added else "already on"
            self.stdout.write(self.style.SUCCESS(f"{user.get_username()} {message} the beta list{suffix}."))
        for user in removals:
            beta_remove(user=user, actor_id=None)
            self.stdout.write(self.style.SUCCESS(f"{user.get_username()} removed from the beta list."))
        self._show()

    def _beta_users_to_remove(self, references: list[str]) -> list[Any]:
        """Resolve every --remove-beta USER before anything changes (an unknown one aborts the call)."""
        users = []
        for reference in references:
            user = find_user(reference)
            if user is None:
                raise CommandError(f"unknown user {reference!r}")
            if not BetaUser.objects.filter(user=user).exists():
                raise CommandError(f"{user.get_username()} is not on the beta list")
            users.append(user)
        return users

    def _show(self) -> None:
        rollout, _ = VoiceRollout.objects.get_or_create(pk=1)
        state = "enabled" if rollout.voice_enabled else "KILL SWITCH ENGAGED"
        self.stdout.write(f"Voice:       {state}")
        self.stdout.write(f"Percentage:  {rollout.percentage} %")
        beta = BetaUser.objects.select_related("user", "user__voice_profile").order_by("added_at")
        self.stdout.write(f"Beta users:  {beta.count()}")
        for entry in beta:
            profile = getattr(entry.user, "voice_profile", None)
            username = entry.user.get_username()
            external = profile.external_id if profile and profile.external_id != username else ""
            note = f" - {entry.note}" if entry.note else ""
            self.stdout.write(f"  {username}{f' (user_id {external})' if external else ''}{note}")

    def _check(self, options: dict) -> None:
        try:
            since = parse_since(options["since"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        gate = kpi_gate(since)
        if options["json"]:
            self.stdout.write(json.dumps(gate, indent=2, default=str))
        else:
            rows = [("SEGMENT", "KPI", "VALUE", "THRESHOLD", "STATUS"), *kpi_rows(gate)]
            self.stdout.write(format_table(rows))
            self.stdout.write(f"\nWindow {gate['window']['since']} → {gate['window']['until']}. "
                              "Decision on the overall row; a KPI without data fails.")
        if not gate["passed"]:
            failed = [name for name, kpi in gate["overall"]["kpis"].items() if not kpi["passed"]]
            raise CommandError(f"KPI gate FAILED: {', '.join(failed)}")
        self.stdout.write(self.style.SUCCESS("KPI gate PASSED."))
