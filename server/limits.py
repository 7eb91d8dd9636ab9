"""Request limits: per-key rate limits, per-tenant training-job quotas and per-request deadlines.

One ASGI middleware admits every HTTP request: it refuses new ones while the server drains for shutdown (503),
takes a token from the caller's bucket (429 `rate_limited` with Retry-After), and gives query and generation
requests a deadline (504 `request_timeout`; a stream that runs past it ends with an error event instead).

Rate-limit buckets live in this process: with several replicas each one allows a key the full rate, so a key's
overall limit is the per-process rate times the number of replicas. Job quotas are counted in the database and
hold across replicas.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.config import Settings
from registry.errors import RegistryError
from registry.models import Job, JobStatus, utcnow
from server.auth import presented_key
from server.errors import RetryLaterError, error_response
from server.shutdown import Drain, ShuttingDownError

MSG_RATE_LIMITED = (
    "this API key is over its limit of {rate:g} requests/s (burst {burst}) on {kind} routes; "
    "retry after {retry_after} s."
)
MSG_JOB_QUOTA = (
    "tenant {tenant!r} has {active} training job(s) queued or running and the limit is {limit} "
    "(KMSERVE_MAX_ACTIVE_JOBS_PER_TENANT); wait for one to finish, or cancel one."
)
MSG_REQUEST_TIMEOUT = (
    "the request ran past this server's deadline of {seconds:g} s (KMSERVE_REQUEST_TIMEOUT_SECONDS) and its "
    "generation was stopped; ask for fewer tokens or retry."
)
# A job-quota refusal's Retry-After is when the tenant's first active training job should end: from a running job's
# progress and elapsed time, else the median of its recent training jobs' run times, else this fallback. Bounded:
# sooner than the floor would only be refused again; later than the ceiling is a guess worth re-checking.
JOB_QUOTA_RETRY_AFTER_SECONDS = 30
JOB_QUOTA_RETRY_AFTER_BOUNDS = (5, 900)
# Progress below this says too little about the remaining time; finished jobs looked at for the median run time.
MIN_PROGRESS_FOR_ESTIMATE = 0.05
RECENT_JOBS_FOR_ESTIMATE = 20
# Buckets kept at most (least recently used dropped first): a bound on memory whatever keys callers invent.
MAX_BUCKETS = 10_000
TRAINING_KIND_PREFIX = "train_"

GENERATION_PATHS = frozenset({"/v1/query", "/v1/chat/completions", "/v1/completions"})
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                          "/redoc"})
# Writes under these prefixes (upload, revise, delete, cancel) count against the upload bucket.
UPLOAD_PREFIXES = ("/v1/documents", "/v1/jobs", "/admin")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
EVENTS_SUFFIX = "/events"

T = TypeVar("T")
_deadline: ContextVar[float | None] = ContextVar("kmserve_request_deadline", default=None)


class RouteKind(enum.Enum):
    """How a route is limited."""

    EXEMPT = "exempt"  # health, readiness, metrics, API docs
    QUERY = "query"  # reads and everything else a query key does
    GENERATE = "generate"  # query and OpenAI generation: the query bucket plus a deadline
    UPLOAD = "upload"  # uploads, job commands and every /admin route


def route_kind(method: str, path: str) -> RouteKind:
    """The limit class of a request."""
    if path in EXEMPT_PATHS:
        return RouteKind.EXEMPT
    if method == "POST" and path in GENERATION_PATHS:
        return RouteKind.GENERATE
    if path.startswith("/admin") or (method not in READ_METHODS and path.startswith(UPLOAD_PREFIXES)):
        return RouteKind.UPLOAD
    return RouteKind.QUERY


class RateLimitedError(RetryLaterError):
    """An API key sent more requests than its bucket allows."""

    code = "rate_limited"
    status = 429

    def __init__(self, limit: RateLimit, kind: str, retry_after: int) -> None:
        message = MSG_RATE_LIMITED.format(rate=limit.rps, burst=limit.burst, kind=kind, retry_after=retry_after)
        super().__init__(message, retry_after=retry_after)


class JobQuotaExceededError(RetryLaterError):
    """A tenant already has as many training jobs queued or running as it may."""

    code = "job_quota_exceeded"
    status = 429

    def __init__(self, tenant: str, active: int, limit: int, retry_after: int) -> None:
        message = MSG_JOB_QUOTA.format(tenant=tenant, active=active, limit=limit)
        super().__init__(message, retry_after=retry_after, limit=limit)


class RequestTimeoutError(RegistryError):
    """A query or generation ran past the request deadline; its generation was aborted."""

    code = "request_timeout"
    status = 504

    def __init__(self, seconds: float) -> None:
        super().__init__(MSG_REQUEST_TIMEOUT.format(seconds=seconds))


# -- rate limits ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """A bucket's refill rate (requests/s; 0 = unlimited) and size (requests sent at once)."""

    rps: float
    burst: int

    @classmethod
    def of(cls, rps: float, burst: int) -> RateLimit:
        """The limit of a setting pair: burst 0 means twice the rate (at least one request)."""
        return cls(rps, burst or max(1, math.ceil(2 * rps)))

    @property
    def enabled(self) -> bool:
        """False for an unlimited route class."""
        return self.rps > 0


@dataclass
class TokenBucket:
    """Holds up to `burst` tokens, refilled at `rps` per second; each request takes one."""

    limit: RateLimit
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be (nothing taken)."""
        self.tokens = min(float(self.limit.burst), self.tokens + (now - self.updated) * self.limit.rps)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.limit.rps


class RateLimiter:
    """Token buckets per (API key, route class); uploads/admin and queries are counted apart."""

    def __init__(self, query: RateLimit, upload: RateLimit, *, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = MAX_BUCKETS) -> None:
        self._limits = {RouteKind.QUERY: query, RouteKind.UPLOAD: upload}
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[RouteKind, str], TokenBucket] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        """The limiter of the process settings."""
        return cls(RateLimit.of(settings.rate_limit_rps, settings.rate_limit_burst),
                   RateLimit.of(settings.upload_rate_limit_rps, settings.upload_rate_limit_burst))

    def check(self, identity: str, kind: RouteKind) -> None:
        """Take a token of `identity` for a request of `kind`; RateLimitedError when its bucket is empty."""
        if kind is RouteKind.EXEMPT:
            return
        kind = RouteKind.QUERY if kind is RouteKind.GENERATE else kind
        limit = self._limits[kind]
        if not limit.enabled:
            return
        wait = self._bucket(identity, kind, limit).take(self._clock())
        if wait > 0:
            raise RateLimitedError(limit, kind.value, math.ceil(wait))

    def _bucket(self, identity: str, kind: RouteKind, limit: RateLimit) -> TokenBucket:
        key = (kind, identity)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(limit, float(limit.burst), self._clock())
            while len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket


def caller_identity(scope: Scope) -> str:
    """Whom a request is counted against: its API key (hashed, never kept in clear), else its address."""
    request = Request(scope)
    key = presented_key(request)
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"addr:{request.client.host if request.client else 'unknown'}"


# -- deadlines -----------------------------------------------------------------------------------------------


def current_deadline() -> float | None:
    """The event-loop time the current request must be answered by (None outside query/generation routes)."""
    return _deadline.get()


async def next_before(items: AsyncIterator[T], deadline: float | None, timeout_seconds: float) -> T:
    """The next item (StopAsyncIteration at the end); RequestTimeoutError once the deadline passes, the wait for
    the item cancelled inside the iterator (an engine stream aborts its request there)."""
    if deadline is None:
        return await anext(items)
    try:
        async with asyncio.timeout_at(deadline) as timer:
            return await anext(items)
    except TimeoutError as exc:
        if timer.expired():
            raise RequestTimeoutError(timeout_seconds) from exc
        raise


# -- job quotas ----------------------------------------------------------------------------------------------


def training_jobs(kinds: Sequence[str]) -> int:
    """How many of these job kinds count against the quota (the training ones)."""
    return sum(1 for kind in kinds if kind.startswith(TRAINING_KIND_PREFIX))


class JobQuota:
    """At most `limit` training jobs queued or running per tenant (0 = no limit), checked in the writing
    transaction so that a refused request leaves nothing behind."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    @classmethod
    def from_settings(cls, settings: Settings) -> JobQuota:
        """The quota of the process settings."""
        return cls(settings.max_active_jobs_per_tenant)

    def ensure_room(self, session: Session, tenant: str, adding: int, *, freed: int = 0) -> None:
        """JobQuotaExceededError unless `adding` more training jobs fit (`freed` of the active ones are leaving)."""
        if self.limit <= 0 or adding <= 0:
            return
        _lock_tenant(session, tenant)
        active = active_training_jobs(session, tenant) - freed
        if active + adding > self.limit:
            raise JobQuotaExceededError(tenant, active, self.limit, quota_retry_after(session, tenant))

    def requeue_guard(self, tenant: str) -> Callable[[Session, Sequence[Job]], None]:
        """A check for `JobQueue.retry`: run after it requeued jobs, before it commits."""

        def guard(session: Session, requeued: Sequence[Job]) -> None:
            adding = training_jobs([job.kind for job in requeued])
            if self.limit <= 0 or adding <= 0:
                return
            _lock_tenant(session, tenant)
            session.flush()
            active = active_training_jobs(session, tenant)
            if active > self.limit:
                raise JobQuotaExceededError(tenant, active - adding, self.limit, quota_retry_after(session, tenant))

        return guard


def active_training_jobs(session: Session, tenant: str) -> int:
    """The tenant's training jobs queued or running (one being cancelled no longer counts)."""
    stmt = select(func.count()).select_from(Job).where(
        Job.tenant == tenant, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
        Job.kind.startswith(TRAINING_KIND_PREFIX, autoescape=True), Job.cancel_requested.is_(False),
    )
    return int(session.scalar(stmt) or 0)


def quota_retry_after(session: Session, tenant: str, now: datetime | None = None) -> int:
    """Seconds until the tenant's first active training job should end (see JOB_QUOTA_RETRY_AFTER_BOUNDS)."""
    now = now or utcnow()
    training = (Job.tenant == tenant, Job.kind.startswith(TRAINING_KIND_PREFIX, autoescape=True))
    running = session.execute(select(Job.started_at, Job.progress).where(
        *training, Job.status == JobStatus.RUNNING, Job.started_at.is_not(None))).all()
    remaining = [(now - started).total_seconds() * (1 - progress) / progress for started, progress in running
                 if started is not None and progress >= MIN_PROGRESS_FOR_ESTIMATE]
    if not remaining:
        finished = session.execute(select(Job.started_at, Job.finished_at).where(
            *training, Job.status == JobStatus.SUCCEEDED, Job.started_at.is_not(None), Job.finished_at.is_not(None),
        ).order_by(Job.finished_at.desc()).limit(RECENT_JOBS_FOR_ESTIMATE)).all()
        run_times = [(end - start).total_seconds() for start, end in finished if start is not None and end is not None]
        elapsed = [(now - started).total_seconds() for started, _ in running if started is not None]
        if run_times:  # the longest-running job is the likeliest to end first
            remaining = [statistics.median(run_times) - max(elapsed, default=0.0)]
    if not remaining:
        return JOB_QUOTA_RETRY_AFTER_SECONDS
    low, high = JOB_QUOTA_RETRY_AFTER_BOUNDS
    return int(min(high, max(low, math.ceil(min(remaining)))))


def _lock_tenant(session: Session, tenant: str) -> None:
    # PostgreSQL: two uploads of one tenant would both count before either inserts; a transaction-scoped
    # advisory lock per tenant makes them take turns. SQLite writers already do (BEGIN IMMEDIATE).
    if session.get_bind().dialect.name == "postgresql":
        digest = hashlib.sha256(f"kmserve-job-quota:{tenant}".encode()).digest()
        session.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True))))


# -- the middleware ------------------------------------------------------------------------------------------


class LimitsMiddleware:
    """Admits HTTP requests: drain refusal, rate limit, in-flight count, and a deadline for generation routes."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, drain: Drain, timeout_seconds: float) -> None:
        self.app = app
        self._limiter = limiter
        self._drain = drain
        self._timeout = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = route_kind(scope["method"], scope["path"])
        try:
            self._admit(scope, kind)
        except ShuttingDownError as exc:
            await error_response(exc, {"Connection": "close"})(scope, receive, send)
            return
        except RateLimitedError as exc:
            await error_response(exc)(scope, receive, send)
            return
        # Job event streams follow a job for minutes and resume from Last-Event-ID: the drain does not wait for them.
        tracked = self._drain.track() if not scope["path"].endswith(EVENTS_SUFFIX) else nullcontext()
        with tracked:
            if kind is RouteKind.GENERATE and self._timeout > 0:
                await self._with_deadline(scope, receive, send)
            else:
                await self.app(scope, receive, send)

    def _admit(self, scope: Scope, kind: RouteKind) -> None:
        if self._drain.refuses(scope["path"]):
            raise ShuttingDownError()
        if kind is not RouteKind.EXEMPT:
            self._limiter.check(caller_identity(scope), kind)

    async def _with_deadline(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request under its deadline until its response starts; a stream then keeps the deadline itself."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        token = _deadline.set(deadline)
        started = False
        try:
            async with asyncio.timeout_at(deadline) as timer:

                async def send_started(message: Message) -> None:
                    nonlocal started
                    if message["type"] == "http.response.start":
                        started = True
                        timer.reschedule(None)
                    await send(message)

                await self.app(scope, receive, send_started)
        except TimeoutError:
            if not timer.expired():
                raise
            if not started:
                await error_response(RequestTimeoutError(self._timeout))(scope, receive, send)
        finally:
            _deadline.reset(token)


def install_limits(app: FastAPI, settings: Settings) -> Drain:
    """Add the limits middleware (drain, rate limits, deadlines) and attach the drain state as `app.state.drain`."""
    drain = Drain()
    app.state.drain = drain
    app.add_middleware(LimitsMiddleware, limiter=RateLimiter.from_settings(settings), drain=drain,
                       timeout_seconds=settings.request_timeout_seconds)
    return drain
