"""User feedback on a voice session: one rating (1–5) and an optional comment, by its owner only."""

from __future__ import annotations

from datetime import timedelta

from django.db import close_old_connections, transaction
from django.utils import timezone

from voice.models import VoiceSession

MAX_COMMENT_CHARS = 1000
FEEDBACK_WINDOW = timedelta(hours=24)


class FeedbackError(Exception):
    """Refused feedback; `status` is the HTTP status that fits (400, 403, 404, 409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def feedback_submit(*, session_id: str, external_user_id: str, rating: object, comment: object = None) -> None:
    """Store a session's feedback (sync; ORM). Called from the socket or the HTTP endpoint."""
    if not isinstance(rating, int) or isinstance(rating, bool) or not 1 <= rating <= 5:
        raise FeedbackError("rating must be an integer from 1 to 5")
    if comment is not None and not isinstance(comment, str):
        raise FeedbackError("comment must be a string")
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise FeedbackError(f"comment must be at most {MAX_COMMENT_CHARS} characters")
    close_old_connections()
    try:
        with transaction.atomic():
            session = VoiceSession.objects.select_for_update().filter(pk=session_id).first()
            if session is None:
                raise FeedbackError("unknown session", 404)
            if session.external_user_id != external_user_id:
                raise FeedbackError("this session belongs to another user", 403)
            if session.feedback_rating is not None:
                raise FeedbackError("this session already has feedback", 409)
            reference = session.ended_at or session.started_at
            if timezone.now() - reference > FEEDBACK_WINDOW:
                raise FeedbackError("feedback is accepted within 24 hours of the session", 400)
            session.feedback_rating = rating
            session.feedback_comment = comment
            session.feedback_at = timezone.now()
            session.save(update_fields=["feedback_rating", "feedback_comment", "feedback_at"])
    finally:
        close_old_connections()
