"""The SQL job queue shared by the server (which enqueues) and trainer workers (which claim jobs under a lease).

PostgreSQL: a claim takes its row with SELECT ... FOR UPDATE SKIP LOCKED, so many workers claim in parallel.
SQLite: every writing transaction begins with BEGIN IMMEDIATE, so claimers take turns on the write lock.
Every event is appended while its job's row is locked, so one job's event ids grow in commit order and
`events_since(job_id, after_id)` never skips one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import transaction, write_transaction
from registry.errors import JobStateError, LeaseLostError, NotFoundError
from registry.models import DEFAULT_TENANT, Job, JobEvent, JobStatus, utcnow
from registry.queue_transitions import (
    cancel_dependents,
    end_job,
    first_expired,
    get_job,
    new_event,
    next_ready,
    requeue_with_dependents,
)
from registry.queue_types import (
    MSG_DEPENDENCY_DEAD,
    MSG_DEPENDENCY_OF_RETRY,
    MSG_LEASE_EXPIRED,
    MSG_NO_CANCEL_REQUESTED,
    MSG_NOT_CANCELLABLE,
    MSG_NOT_RETRYABLE,
    MSG_RELEASED_WHILE_CANCELLING,
    WORKER_ID_MAX,
    HeartbeatResult,
    JobEventType,
    JobSpec,
    checked_progress,
    json_safe,
    retry_delay,
)

__all__ = ["HeartbeatResult", "JobEventType", "JobQueue", "JobSpec"]

Clock = Callable[[], datetime]
# Aliases: inside JobQueue the name `list` is the method.
Jobs = list[Job]
Events = list[JobEvent]
_ENDED_BADLY = (JobStatus.FAILED, JobStatus.CANCELLED)


class JobQueue:
    """Enqueue, claim under a lease, report on, finish and follow jobs; every method is one transaction."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        lease_seconds: float = 60.0,
        backoff_seconds: float = 5.0,
        max_backoff_seconds: float = 600.0,
        max_attempts: int = 3,
        progress_event_seconds: float = 1.0,
        clock: Clock = utcnow,
    ) -> None:
        if lease_seconds <= 0 or backoff_seconds < 0 or max_backoff_seconds < 0 or progress_event_seconds < 0:
            raise ValueError("lease_seconds must be > 0; backoff and progress_event_seconds must be >= 0")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        # Jobs are handed out after their session closed, so they must not be expired by the commit.
        self._sessions = sessionmaker(class_=sessions.class_, **{**sessions.kw, "expire_on_commit": False})
        self._lease = timedelta(seconds=lease_seconds)
        self._backoff = (backoff_seconds, max_backoff_seconds)
        self._max_attempts = max_attempts
        self._progress_every = timedelta(seconds=progress_event_seconds)
        self._clock = clock
        self._last_progress_event: dict[int, datetime] = {}

    @classmethod
    def from_settings(cls, sessions: sessionmaker[Session], settings: Settings, *, clock: Clock = utcnow) -> JobQueue:
        """A queue with the lease, attempts and backoff of the process settings."""
        return cls(sessions, lease_seconds=settings.job_lease_seconds, max_attempts=settings.job_max_attempts,
                   backoff_seconds=settings.job_retry_backoff_seconds, clock=clock)

    # -- producers -------------------------------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 0,
        max_attempts: int | None = None,
        tenant: str = DEFAULT_TENANT,
        document_id: int | None = None,
        depends_on: int | None = None,
    ) -> Job:
        """Add a job; with `depends_on` it becomes claimable only once that job has succeeded."""
        spec = JobSpec(kind, dict(payload or {}), priority, max_attempts, tenant, document_id, depends_on)
        return self.enqueue_many([spec])[0]

    def enqueue_many(self, specs: Iterable[JobSpec]) -> Jobs:
        """Add several jobs in one transaction: all of them or none."""
        specs = list(specs)
        with self._write() as session:
            now = self._clock()
            self._lock_live_dependencies(session, {s.depends_on for s in specs if s.depends_on is not None})
            jobs = [self._new_job(spec, now) for spec in specs]
            session.add_all(jobs)
            session.flush()  # assigns the ids the events refer to
            session.add_all([new_event(job, JobEventType.QUEUED, now) for job in jobs])
        return jobs

    def enqueue_chain(self, specs: Sequence[JobSpec]) -> Jobs:
        """Add jobs that run one after another (ingest -> synthesize -> train_km), in one transaction."""
        with self._write() as session:
            return self.add_chain(session, specs)

    def add_chain(self, session: Session, specs: Sequence[JobSpec]) -> Jobs:
        """Add a chain inside the caller's write transaction (so a document and its jobs commit together)."""
        now = self._clock()
        self._lock_live_dependencies(session, {s.depends_on for s in specs if s.depends_on is not None})
        jobs: Jobs = []
        for spec in specs:
            job = self._new_job(spec, now)
            if jobs:
                job.depends_on_id = jobs[-1].id
            session.add(job)
            session.flush()  # the next job of the chain refers to this id
            session.add(new_event(job, JobEventType.QUEUED, now))
            jobs.append(job)
        return jobs

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued job at once, or ask the worker of a running one to stop (it confirms)."""
        with self._write() as session:
            job, now = get_job(session, job_id, lock=True), self._clock()
            if job.status == JobStatus.QUEUED:
                self._finish(session, job, JobStatus.CANCELLED, now)
            elif job.status != JobStatus.RUNNING:
                raise JobStateError(job.id, job.status.value, MSG_NOT_CANCELLABLE)
            elif not job.cancel_requested:
                job.cancel_requested = True
                session.add(new_event(job, JobEventType.CANCEL_REQUESTED, now))
            return job

    def retry(self, job_id: int, *, guard: Callable[[Session, Sequence[Job]], None] | None = None) -> Job:
        """Queue a failed or cancelled job again with its attempts reset, and the dependents it took down.

        `guard` sees the requeued jobs before the commit; an error it raises rolls the retry back (a quota).
        """
        with self._write() as session:
            # Lock the dependency before the job, the order every other transition locks in.
            dependency_id = session.scalar(select(Job.depends_on_id).where(Job.id == job_id))
            dependency = get_job(session, dependency_id, lock=True) if dependency_id is not None else None
            job, now = get_job(session, job_id, lock=True), self._clock()
            if job.status not in _ENDED_BADLY:
                raise JobStateError(job.id, job.status.value, MSG_NOT_RETRYABLE)
            if dependency is not None and dependency.status in _ENDED_BADLY:
                detail = MSG_DEPENDENCY_OF_RETRY.format(job_id=dependency.id, status=dependency.status.value)
                raise JobStateError(job.id, job.status.value, detail)
            requeued = requeue_with_dependents(session, job, now)
            if guard is not None:
                guard(session, requeued)
            return job

    # -- workers ---------------------------------------------------------------------------------------------

    def claim(self, worker_id: str, kinds: Sequence[str] | None = None) -> Job | None:
        """Lease a job to `worker_id`: first one whose lease expired, else the highest-priority oldest ready one."""
        if not worker_id or len(worker_id) > WORKER_ID_MAX:
            raise ValueError(f"worker_id must be 1..{WORKER_ID_MAX} characters, got {worker_id!r}")
        if kinds is not None and not kinds:
            return None
        with self._write() as session:
            now = self._clock()
            while (expired := first_expired(session, now, kinds)) is not None:
                if self._reclaim(session, expired, now):
                    self._take(session, expired, worker_id, now)
                    return expired
            job = next_ready(session, now, kinds)
            if job is not None:
                self._take(session, job, worker_id, now)
            return job

    def heartbeat(self, job_id: int, worker_id: str) -> HeartbeatResult:
        """Extend the lease of a job the worker holds; tells it whether a cancel was requested."""
        with self._write() as session:
            job = self._owned(session, job_id, worker_id)
            return self._renew(job, self._clock())

    def progress(
        self,
        job_id: int,
        worker_id: str,
        progress: float,
        message: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> HeartbeatResult:
        """Record progress (clamped to [0, 1]), message and metrics (merged); renews the lease like a heartbeat."""
        value, delta = checked_progress(progress), json_safe(dict(metrics or {}))
        with self._write() as session:
            job, now = self._owned(session, job_id, worker_id), self._clock()
            job.progress = value
            job.message = job.message if message is None else message
            if delta:
                job.metrics = {**job.metrics, **delta}
            if self._progress_event_due(job.id, now):
                data = {"progress": value, "message": job.message, "metrics": delta}
                session.add(new_event(job, JobEventType.PROGRESS, now, **data))
            return self._renew(job, now)

    def complete(self, job_id: int, worker_id: str, result: dict[str, Any] | None = None) -> Job:
        """Mark a held job succeeded with its result; its dependents become claimable."""
        with self._write() as session:
            job = self._owned(session, job_id, worker_id)
            # A cancel requested meanwhile is moot: the work is done. Earlier attempts' errors stay in the events.
            job.progress, job.result, job.error = 1.0, json_safe(dict(result or {})), None
            self._finish(session, job, JobStatus.SUCCEEDED, self._clock())
            return job

    def fail(self, job_id: int, worker_id: str, error: str, *, retryable: bool = True) -> Job:
        """Report a failed attempt: queued again after a backoff while attempts remain, else failed for good."""
        with self._write() as session:
            job, now = self._owned(session, job_id, worker_id), self._clock()
            if job.cancel_requested:
                # The run ended while a cancel was pending: honour the cancel rather than retry.
                self._finish(session, job, JobStatus.CANCELLED, now, error=error)
            elif retryable and job.attempts < job.max_attempts:
                self._schedule_retry(session, job, now, error)
            else:
                self._finish(session, job, JobStatus.FAILED, now, error=error)
            return job

    def release(self, job_id: int, worker_id: str) -> Job:
        """Give a held job back (worker shutting down): queued again at once, the claim's attempt not counted.

        A job with a pending cancel ends cancelled instead: giving it back would only run it again.
        """
        with self._write() as session:
            job, now = self._owned(session, job_id, worker_id), self._clock()
            if job.cancel_requested:
                self._finish(session, job, JobStatus.CANCELLED, now, MSG_RELEASED_WHILE_CANCELLING, worker=worker_id)
                return job
            # Preemption is not a failure: return the attempt the claim took, so shutdowns never exhaust a job.
            job.attempts = max(job.attempts - 1, 0)
            job.status, job.run_after = JobStatus.QUEUED, now
            job.lease_owner = job.lease_expires_at = None
            self._last_progress_event.pop(job_id, None)
            session.add(new_event(job, JobEventType.RELEASED, now, worker=worker_id, attempts=job.attempts,
                                  progress=job.progress))
            return job

    def mark_cancelled(self, job_id: int, worker_id: str) -> Job:
        """Confirm, as the worker holding it, that a job whose cancel was requested has stopped."""
        with self._write() as session:
            job = self._owned(session, job_id, worker_id)
            if not job.cancel_requested:
                raise JobStateError(job.id, job.status.value, MSG_NO_CANCEL_REQUESTED)
            self._finish(session, job, JobStatus.CANCELLED, self._clock())
            return job

    # -- readers ---------------------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        """The job with this id."""
        with transaction(self._sessions) as session:
            return get_job(session, job_id)

    def list(
        self,
        *,
        status: JobStatus | None = None,
        kind: str | None = None,
        tenant: str | None = None,
        document_id: int | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Jobs:
        """Jobs matching every filter given, newest first."""
        if limit < 1 or offset < 0:
            raise ValueError(f"limit must be >= 1 and offset >= 0, got limit={limit}, offset={offset}")
        filters = {"status": status, "kind": kind, "tenant": tenant, "document_id": document_id}
        stmt = select(Job).filter_by(**{k: v for k, v in filters.items() if v is not None})
        with transaction(self._sessions) as session:
            return list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit).offset(offset)))

    def events_since(self, job_id: int, after_id: int = 0, limit: int = 1000) -> Events:
        """The job's events with id > `after_id`, oldest first; pass the last id seen to follow a job."""
        stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        with transaction(self._sessions) as session:
            get_job(session, job_id)
            return list(session.scalars(stmt.order_by(JobEvent.id).limit(limit)))

    def stats(self) -> dict[str, int]:
        """How many jobs are in each status (queue depth for metrics)."""
        stmt = select(Job.status, func.count()).group_by(Job.status)
        with transaction(self._sessions) as session:
            counts = {status.value: 0 for status in JobStatus}
            counts.update({status.value: count for status, count in session.execute(stmt)})
            return counts

    # -- transitions -----------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with write_transaction(self._sessions) as session:
            yield session

    def _new_job(self, spec: JobSpec, now: datetime) -> Job:
        return Job(
            kind=spec.kind, payload=json_safe(spec.payload), priority=spec.priority, tenant=spec.tenant,
            max_attempts=spec.max_attempts or self._max_attempts, document_id=spec.document_id,
            depends_on_id=spec.depends_on, status=JobStatus.QUEUED, attempts=0, run_after=now, created_at=now,
        )

    def _lock_live_dependencies(self, session: Session, ids: set[int]) -> None:
        # Locked so that a dependency failing concurrently waits for us and then cancels the new dependents.
        if not ids:
            return
        found = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)).with_for_update())}
        for job_id in sorted(ids):
            dependency = found.get(job_id)
            if dependency is None:
                raise NotFoundError("job", job_id)
            if dependency.status in _ENDED_BADLY:
                raise JobStateError(job_id, dependency.status.value, MSG_DEPENDENCY_DEAD)

    def _owned(self, session: Session, job_id: int, worker_id: str) -> Job:
        job = get_job(session, job_id, lock=True)
        if job.status != JobStatus.RUNNING or job.lease_owner != worker_id:
            self._last_progress_event.pop(job_id, None)
            raise LeaseLostError(job_id, worker_id)
        return job

    def _take(self, session: Session, job: Job, worker_id: str, now: datetime) -> None:
        job.status, job.lease_owner, job.attempts = JobStatus.RUNNING, worker_id, job.attempts + 1
        job.started_at = job.heartbeat_at = now
        job.lease_expires_at = now + self._lease
        session.add(new_event(job, JobEventType.CLAIMED, now, worker=worker_id, attempt=job.attempts))

    def _reclaim(self, session: Session, job: Job, now: datetime) -> bool:
        """Take back a job whose worker stopped renewing its lease; False when it ends for good instead."""
        data = {"previous_owner": job.lease_owner, "attempts": job.attempts}
        if job.cancel_requested:
            self._finish(session, job, JobStatus.CANCELLED, now, error=MSG_LEASE_EXPIRED, **data)
            return False
        if job.attempts >= job.max_attempts:
            self._finish(session, job, JobStatus.FAILED, now, error=MSG_LEASE_EXPIRED, **data)
            return False
        session.add(new_event(job, JobEventType.RECLAIMED, now, **data))
        return True

    def _renew(self, job: Job, now: datetime) -> HeartbeatResult:
        expires = now + self._lease
        job.heartbeat_at, job.lease_expires_at = now, expires
        return HeartbeatResult(job.id, expires, job.cancel_requested)

    def _progress_event_due(self, job_id: int, now: datetime) -> bool:
        # Workers may report every step; one event per interval keeps the events table small. The lease
        # holder is the only writer of a job's progress, so remembering the last event here is enough.
        last = self._last_progress_event.get(job_id)
        if last is not None and now - last < self._progress_every:
            return False
        self._last_progress_event[job_id] = now
        return True

    def _schedule_retry(self, session: Session, job: Job, now: datetime, error: str) -> None:
        delay = retry_delay(job.attempts, *self._backoff)
        job.status, job.error, job.run_after = JobStatus.QUEUED, error, now + delay
        job.lease_owner = job.lease_expires_at = None
        self._last_progress_event.pop(job.id, None)
        session.add(new_event(job, JobEventType.RETRY_SCHEDULED, now, attempt=job.attempts, error=error,
                              delay_seconds=delay.total_seconds(), run_after=job.run_after.isoformat()))

    def _finish(self, session: Session, job: Job, status: JobStatus, now: datetime,
                error: str | None = None, **data: Any) -> None:
        """End the job in `status`; one that did not succeed takes its waiting dependents down with it."""
        end_job(session, job, status, now, error, **data)
        self._last_progress_event.pop(job.id, None)
        if status in _ENDED_BADLY:
            cancel_dependents(session, job, now)

