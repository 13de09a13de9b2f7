"""Django admin for voice: plans, the rollout (kill switch, percentage, beta list), profiles, read-only
sessions and refusals, and the operations dashboard (/admin/voice/voicesession/dashboard/).

Admin edits are audited by Django's LogEntry; rollout and plan edits go through the services so that
caches are cleared and the kill switch reaches live sessions at once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from voice import selectors
from voice.models import (
    AccessRefusal,
    BetaUser,
    PlanAccess,
    VoiceProfile,
    VoiceRollout,
    VoiceSession,
    VoiceTurn,
)
from voice.services.access import budget_cache_clear
from voice.services.plans import beta_add, beta_remove
from voice.services.rollout import broadcast_terminate, rollout_cache_clear, rollout_update
from voice.services.stats import kpi_gate, kpi_rows, live_session_ids_sync
from voice.services.users import plan_cache_clear

DASHBOARD_DAYS = (14, 30)
KPI_WINDOW = timedelta(days=7)
CHART_W, CHART_H, PAD_LEFT, PAD_TOP, PAD_BOTTOM = 640, 150, 56, 10, 20


def _chart(series: list[dict], title: str, keys: list[tuple[str, str, str]], *, kind: str = "bar",
           unit: str = "", threshold: float | None = None) -> dict[str, Any]:
    """Geometry of one inline-SVG chart (the template draws it; values are escaped there)."""
    values = [row[key] for key, _, _ in keys for row in series if row[key] is not None]
    top = max([*values, threshold or 0, 0]) or 1.0
    plot_h, step = CHART_H - PAD_TOP - PAD_BOTTOM, (CHART_W - PAD_LEFT - 4) / max(1, len(series))
    base = PAD_TOP + plot_h

    def y(value: float) -> float:
        return round(base - value / top * plot_h, 1)

    bars, lines = [], []
    for key, label, color in keys:
        points = []
        for i, row in enumerate(series):
            value, x = row[key], PAD_LEFT + i * step
            if value is None:
                continue
            tip = f"{row['day']:%d %b}: {value:.4g}{unit}"
            if kind == "bar":
                bars.append({"x": round(x + step * 0.15, 1), "y": y(value), "w": round(step * 0.7, 1),
                             "h": round(base - y(value), 1), "color": color, "title": tip})
            else:
                points.append({"x": round(x + step / 2, 1), "y": y(value), "title": tip})
        if kind == "line":
            lines.append({"label": label, "color": color, "dots": points,
                          "points": " ".join(f"{p['x']},{p['y']}" for p in points)})
    ticks = [0, len(series) // 2, len(series) - 1] if series else []
    return {
        "title": title, "width": CHART_W, "height": CHART_H, "left": PAD_LEFT, "right": CHART_W - 4,
        "base": base, "top_y": PAD_TOP, "top_label": f"{top:.4g}{unit}", "bars": bars, "lines": lines,
        "legend": [{"label": label, "color": color} for _, label, color in keys],
        "threshold": None if threshold is None else {"y": y(threshold), "label": f"{threshold:.4g}{unit}"},
        "x_labels": [{"x": round(PAD_LEFT + i * step + step / 2, 1), "text": f"{series[i]['day']:%d %b}"}
                     for i in dict.fromkeys(ticks)],
    }


def _charts(series: list[dict]) -> list[dict[str, Any]]:
    """The dashboard's four charts: sessions, first-audio latency, error rate, cost."""
    rows = [{**row, "error_pct": None if row["error_rate"] is None else row["error_rate"] * 100}
            for row in series]
    return [
        _chart(rows, "Sessions per day", [("sessions", "sessions", "#417690")]),
        _chart(rows, "Speech end → first audio (ms)",
               [("p50_ms", "P50", "#79aec8"), ("p95_ms", "P95", "#ba2121")], kind="line",
               unit=" ms", threshold=settings.VOICE_KPI_FIRST_AUDIO_P95_MS),
        _chart(rows, "Error rate (%)", [("error_pct", "errors", "#ba2121")], unit=" %",
               threshold=settings.VOICE_KPI_MAX_ERROR_RATE * 100),
        _chart(rows, "Cost (USD)", [("cost_usd", "cost", "#5b8a3c")], unit=" $"),
    ]


class ReadOnlyMixin:
    """View-only admin: no add, change or delete (operators still see every field)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Called by the admin to show the add button: never."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Called by the admin to allow edits: never."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Called by the admin to allow deletes: never (use `voice_cleanup`)."""
        return False


@admin.register(PlanAccess)
class PlanAccessAdmin(admin.ModelAdmin):
    list_display = ("code", "name", "voice_enabled", "sessions_per_hour", "max_session_seconds",
                    "monthly_budget_usd", "active_subscribers", "realtime_model", "spend_this_month")
    list_editable = ("voice_enabled", "sessions_per_hour", "max_session_seconds", "monthly_budget_usd",
                     "active_subscribers")
    list_display_links = ("code",)
    search_fields = ("code", "name")
    fieldsets = (
        (None, {"fields": ("code", "name", "voice_enabled", "sessions_per_hour", "max_session_seconds",
                           "monthly_budget_usd", "active_subscribers")}),
        ("OpenAI models and voice (empty: the environment default)", {
            "fields": ("realtime_model", "transcription_model", "voice", "vad_type", "vad_eagerness")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[PlanAccess]:
        """Called by the admin for lists and forms: plans with their month spend."""
        return selectors.plans_with_month_spend()

    @admin.display(description="spend this month (USD)", ordering="month_spend")
    def spend_this_month(self, obj: PlanAccess) -> str:
        """Called per row of the plan list."""
        return f"{obj.month_spend:.2f}"

    def save_model(self, request: HttpRequest, obj: PlanAccess, form: Any, change: bool) -> None:
        """Called for the change form and each list_editable row: save, then drop cached plans/spend."""
        super().save_model(request, obj, form, change)
        plan_cache_clear()
        budget_cache_clear()


class BetaUserInline(admin.TabularInline):
    model = BetaUser
    autocomplete_fields = ["user"]
    fields = ("user", "note", "added_at")
    readonly_fields = ("added_at",)
    extra = 1


@admin.register(VoiceRollout)
class VoiceRolloutAdmin(admin.ModelAdmin):
    list_display = ("__str__", "voice_enabled", "percentage", "updated_at")
    fields = ("voice_enabled", "percentage", "updated_at")
    readonly_fields = ("updated_at",)
    inlines = [BetaUserInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Called by the admin: a single rollout row exists (pk=1); no second one."""
        return not VoiceRollout.objects.exists() and super().has_add_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Called by the admin: the rollout row is never deleted (untick voice_enabled instead)."""
        return False

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        """Called for the list URL: go straight to the single row."""
        rollout, _ = VoiceRollout.objects.get_or_create(pk=1)
        return redirect("admin:voice_voicerollout_change", rollout.pk)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict | None = None) -> HttpResponse:
        """Called for the rollout form: adds the KPI gate shown next to the percentage."""
        extra_context = {**(extra_context or {}), "gate": kpi_gate(KPI_WINDOW)}
        extra_context["gate_rows"] = kpi_rows(extra_context["gate"])
        return super().change_view(request, object_id, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: VoiceRollout, form: Any, change: bool) -> None:
        """Called on save: through rollout_update (audit, cache clear, kill-switch broadcast)."""
        rollout = rollout_update(actor_id=request.user.pk, voice_enabled=obj.voice_enabled,
                                 percentage=obj.percentage)
        obj.pk, obj.updated_at = rollout.pk, rollout.updated_at

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        """Called after the beta inline is saved: the beta list changed, drop the cached snapshot."""
        super().save_related(request, form, formsets, change)
        rollout_cache_clear()


@admin.register(VoiceProfile)
class VoiceProfileAdmin(admin.ModelAdmin):
    list_display = ("external_id", "user", "email", "plan", "monthly_budget_usd", "spend_this_month",
                    "beta", "last_seen_at")
    list_editable = ("plan", "monthly_budget_usd")
    list_filter = ("plan",)
    list_select_related = ("user", "plan")
    search_fields = ("external_id", "email", "user__username")
    raw_id_fields = ("user",)
    readonly_fields = ("created_at", "last_seen_at")
    actions = ["add_to_beta", "remove_from_beta"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[VoiceProfile]:
        """Called by the admin: profiles with their month spend."""
        return selectors.profiles_with_month_spend().select_related("user", "plan")

    @admin.display(description="spend this month (USD)", ordering="month_spend")
    def spend_this_month(self, obj: VoiceProfile) -> str:
        """Called per row of the profile list."""
        return f"{obj.month_spend:.2f}"

    @admin.display(description="beta", boolean=True)
    def beta(self, obj: VoiceProfile) -> bool:
        """Called per row: whether the user is on the beta list."""
        return BetaUser.objects.filter(user_id=obj.user_id).exists()

    def save_model(self, request: HttpRequest, obj: VoiceProfile, form: Any, change: bool) -> None:
        """Called on save: a budget change must apply to the next connection."""
        super().save_model(request, obj, form, change)
        budget_cache_clear()

    def has_beta_permission(self, request: HttpRequest) -> bool:
        """Called by the admin for the beta actions: those who may change the rollout."""
        return request.user.has_perm("voice.change_voicerollout")

    @admin.action(description="Add selected users to the beta list", permissions=["beta"])
    def add_to_beta(self, request: HttpRequest, queryset: QuerySet[VoiceProfile]) -> None:
        """Called by the admin action (audited)."""
        added = sum(beta_add(user=p.user, actor_id=request.user.pk) for p in queryset.select_related("user"))
        self.message_user(request, f"{added} user(s) added to the beta list.", messages.SUCCESS)

    @admin.action(description="Remove selected users from the beta list", permissions=["beta"])
    def remove_from_beta(self, request: HttpRequest, queryset: QuerySet[VoiceProfile]) -> None:
        """Called by the admin action (audited)."""
        profiles = queryset.select_related("user")
        removed = sum(beta_remove(user=p.user, actor_id=request.user.pk) for p in profiles)
        self.message_user(request, f"{removed} user(s) removed from the beta list.", messages.SUCCESS)


class VoiceTurnInline(ReadOnlyMixin, admin.TabularInline):
    model = VoiceTurn
    extra = 0
    can_delete = False
    fields = ("index", "speech_ms", "first_audio_ms", "retrieval_used", "retrieval_latency_ms",
              "retrieval_waited_ms", "rag_injected", "input_tokens", "output_tokens", "cost_usd",
              "interrupted", "response_status")
    readonly_fields = fields


@admin.register(VoiceSession)
class VoiceSessionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("id", "external_user_id", "plan", "cohort", "upstream", "started_at", "duration_s",
                    "end_reason", "turns", "cost_usd", "feedback_rating")
    list_filter = ("plan", ("started_at", admin.DateFieldListFilter), "end_reason", "upstream", "cohort")
    search_fields = ("external_user_id", "user__username")
    date_hierarchy = "started_at"
    inlines = [VoiceTurnInline]
    actions = ["terminate_sessions"]

    def has_terminate_permission(self, request: HttpRequest) -> bool:
        """Called for the terminate action and the dashboard's buttons: active staff who view sessions."""
        return request.user.is_active and request.user.is_staff and self.has_view_permission(request)

    @admin.action(description="Terminate selected live sessions", permissions=["terminate"])
    def terminate_sessions(self, request: HttpRequest, queryset: QuerySet[VoiceSession]) -> None:
        """Called by the admin action: close each selected session that is live on any instance."""
        live = set(live_session_ids_sync())
        targets = [str(pk) for pk, reason in queryset.values_list("id", "end_reason")
                   if str(pk) in live or not reason]
        sent = sum(broadcast_terminate(code="terminated", session_id=session_id) for session_id in targets)
        level = messages.SUCCESS if sent == len(targets) else messages.WARNING
        skipped = queryset.count() - len(targets)
        message = f"Termination sent to {sent} of {len(targets)} live session(s) ({skipped} not live)."
        self.message_user(request, message, level)

    def get_urls(self) -> list:
        """Called by the admin site: the dashboard routes come before the object routes."""
        urls = [
            path("dashboard/", self.admin_site.admin_view(self.dashboard_view), name="voice_dashboard"),
            path("dashboard/terminate/", self.admin_site.admin_view(self.terminate_view),
                 name="voice_dashboard_terminate"),
        ]
        return urls + super().get_urls()

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """Called for GET /admin/voice/voicesession/dashboard/?days=14|30."""
        if not self.has_view_permission(request):
            return HttpResponseForbidden()
        days = int(request.GET.get("days", 14)) if request.GET.get("days", "14").isdigit() else 14
        days = days if days in DASHBOARD_DAYS else DASHBOARD_DAYS[0]
        live_ids = live_session_ids_sync()
        rows = selectors.sessions_by_ids(live_ids)
        gate = kpi_gate(KPI_WINDOW)
        context = {
            **self.admin_site.each_context(request),
            "title": "Voice dashboard",
            "opts": self.model._meta,
            "days": days,
            "day_choices": DASHBOARD_DAYS,
            "charts": _charts(selectors.daily_series(days)),
            "live": [{"id": sid, "row": rows.get(sid)} for sid in live_ids],
            "can_terminate": self.has_terminate_permission(request),
            "rollout": VoiceRollout.objects.get_or_create(pk=1)[0],
            "beta_count": BetaUser.objects.count(),
            "gate": gate,
            "gate_rows": kpi_rows(gate),
        }
        return TemplateResponse(request, "admin/voice/dashboard.html", context)

    def terminate_view(self, request: HttpRequest) -> HttpResponse:
        """Called by the dashboard's terminate buttons (POST, CSRF-checked by the admin view wrapper)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_terminate_permission(request):
            return HttpResponseForbidden()
        session_id = request.POST.get("session_id", "")
        if session_id not in live_session_ids_sync():
            messages.error(request, "This session is not live (it may have ended already).")
        elif broadcast_terminate(code="terminated", session_id=session_id):
            messages.success(request, f"Session {session_id} is being terminated.")
        else:
            messages.error(request, "The channel layer is unavailable; the session could not be reached.")
        return HttpResponseRedirect(reverse("admin:voice_dashboard"))


@admin.register(AccessRefusal)
class AccessRefusalAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("at", "code", "plan", "external_user_id")
    list_filter = ("code", "plan", ("at", admin.DateFieldListFilter))
    search_fields = ("external_user_id",)
    date_hierarchy = "at"
