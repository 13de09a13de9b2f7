"""HTTP routes of the voice app (the WebSocket route is in voice/routing.py)."""

from django.urls import path

from voice.views import api, demo, health, ops

urlpatterns = [
    path("v1/voice/health", health.health_view, name="voice-health"),
    path("v1/voice/ticket", api.ticket_view, name="voice-ticket"),
    path("v1/voice/sessions/<uuid:session_id>/feedback", api.feedback_view, name="voice-feedback"),
    path("v1/voice/stats", ops.stats_view, name="voice-stats"),
    path("v1/voice/plans/<slug:code>/subscribers", ops.plan_subscribers_view, name="voice-plan-subscribers"),
    path("metrics", ops.metrics_view, name="voice-metrics"),
    path("voice/demo/", demo.demo_view, name="voice-demo"),
]
