"""Django system checks: the configured OpenAI models must have price rows (run at every start-up)."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Tags, Warning, register
from django.db import DatabaseError


@register()
def check_default_models(app_configs: Any, **kwargs: Any) -> list[Error]:
    """Called by Django at start-up: the environment's default models are priced, the VAD knobs valid."""
    from voice.realtime.models_catalog import settings_problems

    return [Error(problem, hint="Fix the environment or add the price row in intelia_voice/settings.py.",
                  id="voice.E001") for problem in settings_problems()]


@register()
def check_inline_early_transcription(app_configs: Any, **kwargs: Any) -> list[Warning]:
    """Called by Django at start-up: EARLY_TRANSCRIPTION=inline needs a transcription model that streams."""
    from django.conf import settings

    from voice.realtime.models_catalog import transcription_streams

    if settings.EARLY_TRANSCRIPTION == "inline" and not transcription_streams(settings.VOICE_TRANSCRIPTION_MODEL):
        return [Warning(f"EARLY_TRANSCRIPTION=inline but {settings.VOICE_TRANSCRIPTION_MODEL} transcribes only after "
                        "the turn ends: no early words, retrieval starts at the turn end",
                        hint="Use gpt-realtime-whisper, EARLY_TRANSCRIPTION=openai, or auto.", id="voice.W001")]
    return []


@register(Tags.database)
def check_plan_models(app_configs: Any, databases: Any = None, **kwargs: Any) -> list[Error]:
    """Called by `migrate` and `check --database default`: every plan's own models are priced (a price row
    removed from settings after a plan chose the model)."""
    if not databases:
        return []
    from voice.models import PlanAccess
    from voice.realtime.models_catalog import realtime_model_problem, transcription_model_problem

    errors = []
    try:
        plans = list(PlanAccess.objects.exclude(realtime_model="", transcription_model=""))
    except DatabaseError:  # not migrated yet: migrate itself runs this check first
        return []
    for plan in plans:
        for problem in (plan.realtime_model and realtime_model_problem(plan.realtime_model),
                        plan.transcription_model and transcription_model_problem(plan.transcription_model)):
            if problem:
                errors.append(Error(f"plan {plan.code}: {problem}", id="voice.E002"))
    return errors
