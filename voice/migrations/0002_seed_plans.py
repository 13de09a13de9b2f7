"""Seed the subscription plans and the rollout row (voice on, 0 %, empty beta list: a safe rollout)."""

from django.db import migrations

PLANS = [
    # code, name, voice_enabled
    ("essential", "Essential", False),
    ("pro", "Pro", False),
    ("elite", "Elite", True),
    ("intelia", "Intelia", True),
]


def seed(apps, schema_editor):
    PlanAccess = apps.get_model("voice", "PlanAccess")
    VoiceRollout = apps.get_model("voice", "VoiceRollout")
    for code, name, voice in PLANS:
        PlanAccess.objects.get_or_create(code=code, defaults={"name": name, "voice_enabled": voice})
    VoiceRollout.objects.get_or_create(pk=1, defaults={"voice_enabled": True, "percentage": 0})


def unseed(apps, schema_editor):
    apps.get_model("voice", "PlanAccess").objects.filter(code__in=[p[0] for p in PLANS]).delete()


class Migration(migrations.Migration):
    dependencies = [("voice", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]
