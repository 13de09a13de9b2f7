"""`manage.py voice_stats [--since 7d] [--json]`: the usage report of GET /v1/voice/stats."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from voice.services.stats import format_table, format_value, live_session_ids_sync, parse_since, stats_report


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


class Command(BaseCommand):
    help = (
        "Print voice usage statistics: live sessions, sessions today/7 days, error rate, refusals, "
        "first-audio latency percentiles, RAG injection rate, cost, adoption per plan, spend per plan and "
        "top users, and the rollout KPI gate. --json prints the same object as GET /v1/voice/stats."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        parser.add_argument("--since", default="7d", help="Window (default 7d; e.g. 24h, 30d, 2w).")
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
        parser.add_argument("--top", type=int, default=10, help="How many top-spending users (default 10).")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        try:
            since = parse_since(options["since"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        report = stats_report(since=since, live_ids=live_session_ids_sync(), top=max(1, options["top"]))
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, default=str))
            return
        self._print(report, options["since"])

    def _print(self, report: dict[str, Any], label: str) -> None:
        write = self.stdout.write
        latency, cost = report["first_audio_ms"], report["cost_usd"]
        since = report["window"]["since"]
        write(self.style.MIGRATE_HEADING(f"Voice statistics, window {label} (since {since})"))
        write(format_table([
            ("METRIC", "VALUE"),
            ("live sessions", str(report["active_sessions"])),
            ("sessions today / 7d / window", "{today} / {7d} / {window}".format(**report["sessions"])),
            ("error rate", f"{_pct(report['error_rate'])} ({report['errors']} errors)"),
            ("first audio p50 / p95 / p99",
             f"{_fmt(latency['p50'], 0)} / {_fmt(latency['p95'], 0)} / {_fmt(latency['p99'], 0)} ms "
             f"({latency['count']} turns)"),
            ("RAG injection rate", _pct(report["rag_injection_rate"])),
            ("satisfaction (mean, rated)",
             f"{_fmt(report['satisfaction']['mean'], 2)} ({report['satisfaction']['rated']} rated)"),
            ("cost today / month / window (USD)",
             f"{cost['today']:.4f} / {cost['month']:.4f} / {cost['window']:.4f}"),
        ]))
        if report["refusals"]:
            write("\nRefusals")
            write(format_table([("CODE", "COUNT"), *((c, str(n)) for c, n in report["refusals"].items())]))
        if report["end_reasons"]:
            write("\nEnd reasons")
            reasons = report["end_reasons"].items()
            write(format_table([("REASON", "COUNT"), *((r, str(n)) for r, n in reasons)]))
        write("\nAdoption (distinct users with a completed session / active subscribers)")
        write(format_table([("PLAN", "USERS", "SUBSCRIBERS", "RATE"), *(
            (plan, str(row["users"]), _fmt(row["active_subscribers"]), _pct(row["rate"]))
            for plan, row in report["adoption"].items())]))
        write("\nSpend this month per plan")
        write(format_table([("PLAN", "SPEND USD", "BUDGET USD"), *(
            (row["plan"], f"{row['month_usd']:.4f}", _fmt(row["budget_usd"], 2))
            for row in report["spend"]["per_plan"])]))
        if report["spend"]["top_users"]:
            write("\nTop users this month")
            write(format_table([("USER", "SESSIONS", "SPEND USD"), *(
                (row["user_id"], str(row["sessions"]), f"{row['cost_usd']:.4f}")
                for row in report["spend"]["top_users"])]))
        gate = report.get("kpi_gate")
        if gate:
            write("\nRollout KPI gate (overall): " + ("PASS" if gate["passed"] else "FAIL"))
            write(format_table([("KPI", "VALUE", "THRESHOLD", "STATUS"), *(
                (name, format_value(name, kpi["value"]), format_value(name, kpi["threshold"]), kpi["status"])
                for name, kpi in gate["overall"]["kpis"].items())]))
