"""Values of the job queue: what to enqueue, what a lease renewal tells a worker, event types, retry delays."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from registry.models import DEFAULT_TENANT, JobStatus

MSG_LEASE_EXPIRED = "lease expired"
MSG_RELEASED_WHILE_CANCELLING = "the worker stopped while a cancel was pending; the job ends cancelled."
MSG_DEPENDENCY_ENDED = "dependency job {job_id} {status}; this job runs only if job {job_id} is retried."
MSG_NOT_CANCELLABLE = "only queued or running jobs can be cancelled."
MSG_NOT_RETRYABLE = "only failed or cancelled jobs can be retried."
MSG_NO_CANCEL_REQUESTED = "no cancel was requested; report a failure with fail() instead."
MSG_DEPENDENCY_DEAD = "a job cannot wait on it; retry it first."
MSG_DEPENDENCY_OF_RETRY = "retry its dependency job {job_id} ({status}) first."
MSG_PROGRESS = "progress must be a finite number in [0, 1], got {value!r}"

KIND_MAX = 64
WORKER_ID_MAX = 128


class JobEventType(enum.StrEnum):
    """The `type` of a JobEvent: one per state transition, plus throttled progress reports."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    PROGRESS = "progress"
    RETRY_SCHEDULED = "retry_scheduled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELLED = "cancelled"
    RECLAIMED = "reclaimed"
    RELEASED = "released"


@dataclass(frozen=True)
class JobSpec:
    """One job to enqueue; `max_attempts=None` takes the queue's default."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int | None = None
    tenant: str = DEFAULT_TENANT
    document_id: int | None = None
    depends_on: int | None = None

    def __post_init__(self) -> None:
        if not self.kind or len(self.kind) > KIND_MAX:
            raise ValueError(f"kind must be 1..{KIND_MAX} characters (such as 'ingest'), got {self.kind!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class HeartbeatResult:
    """What a worker learns when it renews a lease: until when it holds the job and whether to stop."""

    job_id: int
    lease_expires_at: datetime
    cancel_requested: bool


def dependency_ended_messages(job_id: int) -> list[str]:
    """The errors a dependent of `job_id` gets when that job ends failed or cancelled."""
    return [MSG_DEPENDENCY_ENDED.format(job_id=job_id, status=s.value) for s in (JobStatus.FAILED,
                                                                              JobStatus.CANCELLED)]


def retry_delay(attempts: int, base_seconds: float, max_seconds: float) -> timedelta:
    """Exponential backoff after the `attempts`-th failed attempt: base * 2**(attempts-1), capped."""
    exponent = min(max(attempts - 1, 0), 62)  # beyond 2**62 the cap has long applied; avoids float overflow
    return timedelta(seconds=min(base_seconds * 2.0**exponent, max_seconds))


def checked_progress(value: float) -> float:
    """`value` clamped into [0, 1]; NaN and infinities are refused because no clamp can make sense of them."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(MSG_PROGRESS.format(value=value))
    return min(max(float(value), 0.0), 1.0)


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats spelled as strings: PostgreSQL's JSON type rejects NaN and Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
