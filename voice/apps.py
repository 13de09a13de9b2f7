import functools

from django.apps import AppConfig


class VoiceConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "voice"
    verbose_name = "Intelia Voice"

    def ready(self) -> None:
        """Called once by Django at start-up."""
        import redis.utils

        from voice import checks  # noqa: F401 - registers the system checks

        # redis-py reads its own version from the installed package's metadata (an email-format parse,
        # ~5 ms) for every new pooled connection. A burst of session ends grows the pools of SharedState
        # and channels-redis by dozens of connections at once: that parse stalled the event loop (and
        # every live session's audio) for seconds (found by bench/relay.py). The version cannot change.
        if not hasattr(redis.utils.get_lib_version, "cache_info"):
            redis.utils.get_lib_version = functools.cache(redis.utils.get_lib_version)
