"""HTTP routes of the voice app (the WebSocket route is in voice/routing.py)."""

from django.urls import path

from voice.views import api, health

urlpatterns = [
    path("v1/voice/health", health.health_view, name="voice-health"),
    path("v1/voice/ticket", api.ticket_view, name="voice-ticket"),
    path("v1/voice/sessions/<uuid:session_id>/feedback", api.feedback_view, name="voice-feedback"),
]
