"""Voice data model: plans, rollout, user profiles, and per-session / per-turn metrics."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


class PlanAccess(models.Model):
    """One row per subscription plan: whether it has voice, and its limits."""

    code = models.SlugField(max_length=32, unique=True)
    name = models.CharField(max_length=64)
    voice_enabled = models.BooleanField(default=False)
    sessions_per_hour = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: MAX_SESSIONS_PER_USER_PER_HOUR."
    )
    max_session_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: MAX_SESSION_DURATION."
    )
    monthly_budget_usd = models.DecimalField(
        max_digits=10, decimal_places=2, null=True, blank=True, help_text="Empty: no budget cap."
    )
    active_subscribers = models.PositiveIntegerField(
        null=True, blank=True, help_text="Kept current by the main application; the adoption KPI divides by it."
    )
    # The OpenAI side of the plan's sessions; blank: the environment default. A model needs a price row.
    realtime_model = models.CharField(
        max_length=64, blank=True, help_text="Empty: OPENAI_REALTIME_MODEL. Must have a price row (VOICE_PRICES)."
    )
    transcription_model = models.CharField(
        max_length=64, blank=True,
        help_text="Empty: VOICE_TRANSCRIPTION_MODEL. Must have a price row (VOICE_TRANSCRIPTION_PRICES); "
                  "gpt-realtime-whisper streams the transcript while the user speaks.",
    )
    voice = models.CharField(max_length=32, blank=True, help_text="Empty: VOICE_NAME (e.g. marin, cedar).")
    vad_type = models.CharField(
        max_length=16, blank=True, choices=[("server_vad", "server_vad"), ("semantic_vad", "semantic_vad")],
        help_text="Empty: VOICE_VAD_TYPE.",
    )
    vad_eagerness = models.CharField(
        max_length=8, blank=True, choices=[(e, e) for e in ("auto", "low", "medium", "high")],
        help_text="semantic_vad only. Empty: VOICE_VAD_EAGERNESS.",
    )

    class Meta:
        ordering = ["code"]
        verbose_name = "plan access"
        verbose_name_plural = "plan access"

    def clean(self) -> None:
        """Called by full_clean (admin forms, `voice_plans --set`): refuse models without a price row."""
        from django.core.exceptions import ValidationError

        from voice.realtime.models_catalog import realtime_model_problem, transcription_model_problem

        errors = {}
        if self.realtime_model and (problem := realtime_model_problem(self.realtime_model)):
            errors["realtime_model"] = problem
        if self.transcription_model and (problem := transcription_model_problem(self.transcription_model)):
            errors["transcription_model"] = problem
        if errors:
            raise ValidationError(errors)

    def __str__(self) -> str:
        return f"{self.name} ({'voice' if self.voice_enabled else 'no voice'})"


class VoiceRollout(models.Model):
    """The runtime rollout switches (a single row, pk=1)."""

    voice_enabled = models.BooleanField(
        default=True, help_text="Kill switch: untick to disable voice everywhere at once (live sessions close)."
    )
    percentage = models.PositiveSmallIntegerField(
        default=0,
        validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="Share of users (deterministic per user id) admitted besides the beta list.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "voice rollout"
        verbose_name_plural = "voice rollout"

    def __str__(self) -> str:
        state = "enabled" if self.voice_enabled else "KILL SWITCH ENGAGED"
        return f"Voice rollout: {state}, {self.percentage}%"


class BetaUser(models.Model):
    """A user always admitted by the rollout (the beta list)."""

    rollout = models.ForeignKey(VoiceRollout, on_delete=models.CASCADE, related_name="beta_users")
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="voice_beta")
    added_at = models.DateTimeField(auto_now_add=True)
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-added_at"]

    def __str__(self) -> str:
        return str(self.user)


class VoiceProfile(models.Model):
    """The local record of a user known through JWTs issued by the main application."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="voice_profile")
    external_id = models.CharField(max_length=128, unique=True, help_text="The JWT user_id claim.")
    email = models.EmailField(blank=True)
    plan = models.ForeignKey(PlanAccess, null=True, blank=True, on_delete=models.SET_NULL, related_name="profiles")
    monthly_budget_usd = models.DecimalField(max_digits=10, decimal_places=2, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.external_id


class EndReason(models.TextChoices):
    CLIENT_CLOSED = "client_closed", "Client closed"
    TIMEOUT = "timeout", "Max duration reached"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable", "Upstream unavailable"
    UPSTREAM_ERROR = "upstream_error", "Upstream fatal error"
    INTERNAL_ERROR = "internal_error", "Internal error"
    FEATURE_DISABLED = "feature_disabled", "Kill switch"
    TERMINATED = "terminated", "Terminated by an operator"
    DRAINING = "draining", "Instance draining"
    POLICY = "policy", "Closed by policy"


# End reasons that count as failures in the error-rate KPI (refusals and user actions do not).
ERROR_END_REASONS = (EndReason.UPSTREAM_UNAVAILABLE, EndReason.UPSTREAM_ERROR, EndReason.INTERNAL_ERROR)


class Cohort(models.TextChoices):
    BETA = "beta", "Beta list"
    PERCENTAGE = "percentage", "Percentage bucket"
    EVERYONE = "everyone", "Everyone (100%)"


class VoiceSession(models.Model):
    """One voice session (possibly spanning several connections through resume)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="voice_sessions"
    )
    external_user_id = models.CharField(max_length=128, db_index=True)
    plan = models.CharField(max_length=32, db_index=True)
    cohort = models.CharField(max_length=16, choices=Cohort.choices, blank=True)
    upstream = models.CharField(max_length=16)
    model = models.CharField(max_length=64, blank=True)
    instance = models.CharField(max_length=128, blank=True, help_text="The instance that served the latest connection.")
    started_at = models.DateTimeField(db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    duration_s = models.FloatField(default=0)
    end_reason = models.CharField(max_length=32, choices=EndReason.choices, blank=True, db_index=True)
    close_code = models.PositiveIntegerField(null=True, blank=True)
    connections = models.PositiveIntegerField(default=1, help_text="1 + number of resumes.")
    frames_in = models.PositiveBigIntegerField(default=0)
    frames_out = models.PositiveBigIntegerField(default=0)
    bytes_in = models.PositiveBigIntegerField(default=0)
    bytes_out = models.PositiveBigIntegerField(default=0)
    turns = models.PositiveIntegerField(default=0)
    interruptions = models.PositiveIntegerField(default=0)
    rag_queries = models.PositiveIntegerField(default=0)
    rag_hits = models.PositiveIntegerField(default=0)
    input_text_tokens = models.PositiveIntegerField(default=0)
    input_audio_tokens = models.PositiveIntegerField(default=0)
    cached_text_tokens = models.PositiveIntegerField(default=0)
    cached_audio_tokens = models.PositiveIntegerField(default=0)
    output_text_tokens = models.PositiveIntegerField(default=0)
    output_audio_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    error = models.TextField(blank=True)
    feedback_rating = models.PositiveSmallIntegerField(null=True, blank=True)
    feedback_comment = models.TextField(blank=True)
    feedback_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.external_user_id})"


class VoiceTurn(models.Model):
    """One user turn and the assistant's answer to it."""

    session = models.ForeignKey(VoiceSession, on_delete=models.CASCADE, related_name="turn_set")
    index = models.PositiveIntegerField()
    started_at = models.DateTimeField(null=True, blank=True)
    speech_ms = models.PositiveIntegerField(null=True, blank=True)
    retrieval_used = models.BooleanField(default=False)
    retrieval_started_ms = models.IntegerField(null=True, blank=True, help_text="ms after speech start")
    retrieval_latency_ms = models.FloatField(null=True, blank=True)
    retrieval_waited_ms = models.FloatField(null=True, blank=True)
    rag_injected = models.BooleanField(default=False)
    first_audio_ms = models.FloatField(null=True, blank=True, help_text="speech end → first audio byte sent")
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    interrupted = models.BooleanField(default=False)
    response_status = models.CharField(max_length=16, blank=True)

    class Meta:
        ordering = ["session", "index"]
        constraints = [models.UniqueConstraint(fields=["session", "index"], name="uniq_turn_index")]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.index}"


class AccessRefusal(models.Model):
    """A refused connection (policy refusals are counted apart from errors)."""

    external_user_id = models.CharField(max_length=128, blank=True, db_index=True)
    plan = models.CharField(max_length=32, blank=True)
    code = models.CharField(max_length=32, db_index=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-at"]
