"""Row-level transitions of jobs and the events they append; callers hold the rows' locks in their transaction."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, bindparam, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from registry.errors import NotFoundError
from registry.models import Job, JobEvent, JobStatus
from registry.queue_types import MSG_DEPENDENCY_ENDED, JobEventType, dependency_ended_messages

_T = TypeVar("_T")
_DEPENDENCY = aliased(Job, name="dependency")


def first_expired(session: Session, now: datetime, kinds: Sequence[str] | None) -> Job | None:
    """A running job whose lease ran out (its worker died or hung), locked for the caller to take over."""
    return session.scalars(_expired(kinds is not None), _params(now=now, kinds=kinds)).first()


def next_ready(session: Session, now: datetime, kinds: Sequence[str] | None) -> Job | None:
    """The most urgent job that is queued, due and unblocked, locked: highest priority, then oldest."""
    # One priority at a time, so that each query walks ix_jobs_claim (status, priority, id) in order and stops
    # at the first ready row instead of sorting every queued job on each claim.
    with_kinds = kinds is not None
    priority = session.scalar(_top_priority(with_kinds, below=False), _params(kinds=kinds))
    while priority is not None:
        ready = _ready_at_priority(with_kinds)
        job = session.scalars(ready, _params(now=now, kinds=kinds, priority=priority)).first()
        if job is not None:
            return job
        priority = session.scalar(_top_priority(with_kinds, below=True), _params(kinds=kinds, below=priority))
    return None


# The claim statements are built once with bound parameters: building them on every claim cost about as
# much CPU as running them.
@functools.cache
def _expired(with_kinds: bool) -> Select[Job]:
    stmt = select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < bindparam("now"))
    return _for_claim(_of_kinds(stmt, with_kinds).order_by(Job.id))


@functools.cache
def _top_priority(with_kinds: bool, *, below: bool) -> Select[int | None]:
    stmt = select(func.max(Job.priority)).where(Job.status == JobStatus.QUEUED)
    if below:
        stmt = stmt.where(Job.priority < bindparam("below"))
    return _of_kinds(stmt, with_kinds)


@functools.cache
def _ready_at_priority(with_kinds: bool) -> Select[Job]:
    dependency_done = exists().where(_DEPENDENCY.id == Job.depends_on_id, _DEPENDENCY.status == JobStatus.SUCCEEDED)
    stmt = select(Job).where(
        Job.status == JobStatus.QUEUED, Job.priority == bindparam("priority"), Job.run_after <= bindparam("now"),
        or_(Job.depends_on_id.is_(None), dependency_done),
    )
    return _for_claim(_of_kinds(stmt, with_kinds).order_by(Job.id))


def _of_kinds(stmt: Select[_T], with_kinds: bool) -> Select[_T]:
    return stmt.where(Job.kind.in_(bindparam("kinds", expanding=True))) if with_kinds else stmt


def _for_claim(stmt: Select[Job]) -> Select[Job]:
    # SKIP LOCKED: a row another claimer holds is passed over rather than waited for (PostgreSQL);
    # SQLite renders no FOR UPDATE and relies on BEGIN IMMEDIATE instead.
    return stmt.limit(1).with_for_update(skip_locked=True, of=Job)


def _params(**values: Any) -> dict[str, Any]:
    return {name: list(value) if name == "kinds" else value for name, value in values.items() if value is not None}


def get_job(session: Session, job_id: int, *, lock: bool = False) -> Job:
    """The job with this id (row-locked with `lock`), or NotFoundError."""
    job = session.get(Job, job_id, with_for_update=lock)
    if job is None:
        raise NotFoundError("job", job_id)
    return job


def new_event(job: Job, event_type: JobEventType, now: datetime, **data: Any) -> JobEvent:
    """An event of `job` at `now`, carrying `data`."""
    return JobEvent(job_id=job.id, type=event_type.value, data=data, created_at=now)


def end_job(session: Session, job: Job, status: JobStatus, now: datetime, error: str | None, **data: Any) -> None:
    """Put `job` in a final status, recording `error` when given, and append the matching event."""
    job.status, job.finished_at, job.lease_expires_at = status, now, None
    if error is not None:
        job.error = data["error"] = error
    session.add(new_event(job, JobEventType(status.value), now, **data))


def cancel_dependents(session: Session, job: Job, now: datetime) -> None:
    """Cancel, transitively, the queued jobs waiting on `job`, with an error naming the job they waited on."""
    pending = [job]
    while pending:
        ended = pending.pop()
        waiting = select(Job).where(Job.depends_on_id == ended.id, Job.status == JobStatus.QUEUED)
        for dependent in session.scalars(waiting.order_by(Job.id).with_for_update()):
            error = MSG_DEPENDENCY_ENDED.format(job_id=ended.id, status=ended.status.value)
            end_job(session, dependent, JobStatus.CANCELLED, now, error, dependency_id=ended.id)
            pending.append(dependent)


def requeue_with_dependents(session: Session, job: Job, now: datetime) -> list[Job]:
    """Queue `job` afresh, and with it, transitively, the dependents its end cancelled; returns them all."""
    pending, requeued = [job], []
    while pending:
        current = pending.pop()
        casualties = select(Job).where(
            Job.depends_on_id == current.id, Job.status == JobStatus.CANCELLED,
            Job.error.in_(dependency_ended_messages(current.id)),
        )
        pending.extend(session.scalars(casualties.order_by(Job.id).with_for_update()))
        _requeue(session, current, now)
        requeued.append(current)
    return requeued


def _requeue(session: Session, job: Job, now: datetime) -> None:
    job.status, job.attempts, job.run_after, job.cancel_requested = JobStatus.QUEUED, 0, now, False
    job.lease_owner = job.lease_expires_at = job.error = job.finished_at = None
    job.progress, job.message, job.metrics, job.result = 0.0, "", {}, {}
    session.add(new_event(job, JobEventType.QUEUED, now, retry=True))
