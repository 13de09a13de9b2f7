"""The access decision: who may open a voice session, in one function and one documented order.

Authentication comes first (the consumer refuses with 4401 before calling this). Then, in order:

1. master switch `ENABLE_VOICE_REALTIME` off, or the runtime kill switch engaged → feature_disabled (4503)
2. plan without voice → plan_not_allowed (4403)
3. not on the beta list and outside the percentage bucket → not_in_rollout (4403)
4. the plan's (or the user's) monthly budget spent → budget_exhausted (4402)
5. hourly sessions used up (moving window, per user, shared through Redis) → rate_limited (4429)
   — skipped when resuming a session: a resume is the same session, not a new one
6. another live session of the same user → concurrent_session (4409)

Only a session that actually starts is counted in the hourly window (`session_window`: written with the
resume state once the session is ready).

A session that ends gives its slots back first, before anything slow (`slot_release_begin`): a user who
hangs up and redials at once must not find their own ended session still holding the concurrency slot. A
redial admitted on this instance while that release is still in flight waits for it; one admitted on another
instance retries the slot a few times (0.35 s in all) before it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from django.conf import settings
from limits import RateLimitItemPerHour

from voice.models import AccessRefusal
from voice.realtime.registry import loop_local
from voice.services.auth import Identity
from voice.services.db import run_db
from voice.services.rollout import rollout_cohort, rollout_snapshot
from voice.services.state import ADMITTED, NO_SLOT, RATE_LIMITED, get_state
from voice.services.stats import ACTIVE_SESSIONS_KEY
from voice.services.users import LocalUser, PlanPolicy, plan_policies, users_for_identities

PLAN_NOT_ALLOWED_MESSAGE = "Voice is reserved for the Elite and Intelia plans"
NOT_IN_ROLLOUT_MESSAGE = "Feature not available for your account"
CONCURRENT_SLOT_TTL = 30.0  # seconds; live sessions refresh their slot every 10 s
RELEASE_WAIT_SECONDS = 2.0  # how long an admission waits for the same user's ending session to let go
REDIAL_RETRY_DELAYS = (0.05, 0.1, 0.2)  # slot retries before refusing concurrent_session (another instance)


@dataclass(frozen=True)
class Refusal:
    code: str
    close_code: int
    message: str
    retry_after: int | None = None

    def event(self) -> dict:
        """The `gateway.error` event sent before the policy close."""
        event = {"type": "gateway.error", "code": self.code, "message": self.message}
        if self.retry_after is not None:
            event["retry_after"] = self.retry_after
        return event


@dataclass(frozen=True)
class Admission:
    user: LocalUser
    plan: PlanPolicy
    cohort: str


UNAUTHORIZED = Refusal("unauthorized", 4401, "Authentication required")
FEATURE_DISABLED = Refusal("feature_disabled", 4503, "Voice is temporarily unavailable")


def _resolve_identities(identities: list[Identity]) -> tuple[list[LocalUser | Exception], dict[str, PlanPolicy]]:
    users = users_for_identities([(identity.user_id, identity.email, identity.plan) for identity in identities])
    return users, plan_policies()


class IdentityLookups:
    """The access decision's database reads, batched: while the database thread resolves one batch of
    identities, the admissions that arrive meanwhile queue, and the next job takes all of them (one query).

    In a reconnect storm each admission used to hop to the database thread alone. Each hop needs the GIL a
    few times on a thread that competes with the busy event loop for it (up to a switch interval, 5 ms, each
    time), and the hops queued behind each other: a mean of 11 ms and a p95 of 54 ms per lookup
    (docs/BENCHMARKS.md). One job per batch pays that once for all of them."""

    def __init__(self) -> None:
        self._pending: list[tuple[Identity, asyncio.Future[tuple[LocalUser, dict[str, PlanPolicy]]]]] = []
        self._running = False

    async def resolve(self, identity: Identity) -> tuple[LocalUser, dict[str, PlanPolicy]]:
        """Called by each admission: its local user and the plans."""
        future: asyncio.Future[tuple[LocalUser, dict[str, PlanPolicy]]] = asyncio.get_running_loop().create_future()
        self._pending.append((identity, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    users, plans = await run_db(_resolve_identities, [identity for identity, _ in batch])
                except Exception as exc:  # noqa: BLE001 - the database failed: each admission of the batch fails
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), user in zip(batch, users, strict=True):
                    if future.done():  # its connection went away meanwhile
                        continue
                    if isinstance(user, Exception):
                        future.set_exception(user)
                    else:
                        future.set_result((user, plans))
        finally:
            self._running = False


_lookups: dict[asyncio.AbstractEventLoop, IdentityLookups] = {}


def rate_item(plan: PlanPolicy) -> RateLimitItemPerHour:
    """The hourly session window of a plan."""
    return RateLimitItemPerHour(plan.sessions_per_hour)


def rate_key(external_user_id: str) -> str:
    return f"sessions:{external_user_id}"


def concurrency_key(external_user_id: str) -> str:
    return f"user_sessions:{external_user_id}"


async def access_decide(
    *, identity: Identity, session_id: str, resuming: bool = False
) -> Admission | Refusal:
    """Called once per authenticated connection, before any upstream is opened."""
    if not settings.ENABLE_VOICE_REALTIME:
        return FEATURE_DISABLED
    rollout = await rollout_snapshot()
    if not rollout.voice_enabled:
        return FEATURE_DISABLED

    user, plans = await loop_local(_lookups, IdentityLookups).resolve(identity)
    plan_code = identity.plan or user.plan_code or ""
    plan = plans.get(plan_code)
    if plan is None or not plan.voice_enabled:
        return await _refused(Refusal("plan_not_allowed", 4403, PLAN_NOT_ALLOWED_MESSAGE), identity, plan_code)

    cohort = rollout_cohort(rollout, user_pk=user.pk, external_user_id=identity.user_id)
    if cohort is None:
        return await _refused(Refusal("not_in_rollout", 4403, NOT_IN_ROLLOUT_MESSAGE), identity, plan_code)

    budget_refusal = await _budget_refusal(user, plan)
    if budget_refusal is not None:
        return await _refused(budget_refusal, identity, plan_code)

    # The hourly window and the slot in one round trip (a resume is not a new session: no window check).
    state = get_state()
    slot_key = concurrency_key(identity.user_id)
    await _released(identity.user_id)
    rate = None if resuming else (rate_item(plan), rate_key(identity.user_id))
    outcome = await _admit(rate, slot_key, session_id)
    if outcome == RATE_LIMITED and rate is not None:
        _, retry_after = await state.rate_check(*rate)  # when the window frees a place (refusals only)
        message = f"Rate limit exceeded ({plan.sessions_per_hour} sessions/hour max)"
        return await _refused(Refusal("rate_limited", 4429, message, max(1, retry_after)), identity, plan_code)
    if outcome == NO_SLOT and not await _slot_acquire_after_redial(slot_key, session_id):
        message = "You already have a voice session open; close it first"
        return await _refused(Refusal("concurrent_session", 4409, message), identity, plan_code)
    return Admission(user=user, plan=plan, cohort=cohort)


# (event loop, external user id) → the slot release of that user's ending session on this process.
_releasing: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Task[None]] = {}


def slot_release_begin(*, external_user_id: str, session_id: str) -> asyncio.Task[None]:
    """Called synchronously as a session starts ending, before any await: its concurrency slot and live
    session slot go back now, while the rest of the end (upstream close, rows) takes its time."""
    loop = asyncio.get_running_loop()
    key = (loop, external_user_id)
    task = loop.create_task(_release_slots(external_user_id, session_id))
    _releasing[key] = task

    def forget(done: asyncio.Task[None]) -> None:
        if _releasing.get(key) is done:
            del _releasing[key]

    task.add_done_callback(forget)
    return task


def session_slots(external_user_id: str, session_id: str) -> list[tuple[str, str]]:
    """The slots an admitted session holds: its user's concurrency slot and its live-session slot."""
    return [(concurrency_key(external_user_id), session_id), (ACTIVE_SESSIONS_KEY, session_id)]


async def _release_slots(external_user_id: str, session_id: str) -> None:
    with contextlib.suppress(Exception):
        await get_state().slots_release(session_slots(external_user_id, session_id))


async def _admit(rate: tuple[RateLimitItemPerHour, str] | None, slot_key: str, session_id: str) -> str:
    """The hourly window (unless `rate` is None), the user's concurrency slot and, once it is taken, the
    live-session slot: one round trip."""
    return await get_state().admit(rate=rate, slot_key=slot_key, member=session_id,
                                   limit=settings.MAX_CONCURRENT_SESSIONS_PER_USER, ttl=CONCURRENT_SLOT_TTL,
                                   also=(ACTIVE_SESSIONS_KEY,))


async def _slot_acquire_after_redial(slot_key: str, session_id: str) -> bool:
    """A user who hung up on another instance and redialled here at once may arrive while that instance's
    release is still in flight (a Redis round trip): a few short retries (0.35 s in all) before refusing."""
    for delay in REDIAL_RETRY_DELAYS:
        await asyncio.sleep(delay)
        if await _admit(None, slot_key, session_id) == ADMITTED:
            return True
    return False


async def _released(external_user_id: str) -> None:
    """Wait (bounded) for the slot release of this user's session that is ending on this process, if any."""
    pending = _releasing.get((asyncio.get_running_loop(), external_user_id))
    if pending is not None:
        await asyncio.wait({pending}, timeout=RELEASE_WAIT_SECONDS)


def session_window(*, identity: Identity, plan: PlanPolicy) -> tuple[RateLimitItemPerHour, str]:
    """The hourly window a new (not resumed) session counts in once it is ready."""
    return rate_item(plan), rate_key(identity.user_id)


async def _refused(refusal: Refusal, identity: Identity, plan_code: str) -> Refusal:
    from voice import metrics

    metrics.record_refusal(refusal.code)

    await run_db(AccessRefusal.objects.create, external_user_id=identity.user_id, plan=plan_code,
                 code=refusal.code)
    return refusal


_budget_cache: dict[str, tuple[float, float]] = {}
BUDGET_CACHE_SECONDS = 5.0


async def _budget_refusal(user: LocalUser, plan: PlanPolicy) -> Refusal | None:
    from voice.selectors import month_spend_usd

    checks = []
    if user.monthly_budget_usd is not None:
        checks.append((f"user:{user.pk}", user.monthly_budget_usd, {"user_id": user.pk}, "your"))
    if plan.monthly_budget_usd is not None:
        checks.append((f"plan:{plan.code}", plan.monthly_budget_usd, {"plan": plan.code}, "your plan's"))
    for cache_key, budget, filters, whose in checks:
        cached = _budget_cache.get(cache_key)
        if cached is None or time.monotonic() - cached[0] > BUDGET_CACHE_SECONDS:
            spent = await run_db(month_spend_usd, **filters)
            cached = (time.monotonic(), spent)
            _budget_cache[cache_key] = cached
        if cached[1] >= budget:
            return Refusal(
                "budget_exhausted", 4402, f"Voice budget reached for {whose} account this month"
            )
    return None


def budget_cache_clear() -> None:
    """Forget cached spend figures (tests, operators)."""
    _budget_cache.clear()
