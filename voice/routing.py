"""WebSocket routes."""

from django.urls import path

from voice.consumers import VoiceConsumer

websocket_urlpatterns = [
    path("v1/ws/voice", VoiceConsumer.as_asgi()),
]
