"""ASGI entry point: HTTP goes to Django, WebSockets through origin validation to the voice routing."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "intelia_voice.settings")
# Django must be set up before the consumers (which import models) are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from voice.observability.sentry import wrap_websocket_app  # noqa: E402
from voice.routing import websocket_urlpatterns  # noqa: E402
from voice.security import VoiceOriginValidator  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": wrap_websocket_app(VoiceOriginValidator(URLRouter(websocket_urlpatterns))),
    }
)
