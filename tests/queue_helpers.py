"""Shared pieces of the job-queue tests: a clock that moves only when told, and short-hands for common steps."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from registry.models import Job
from registry.queue import JobQueue

LEASE = 30.0


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def claim(queue: JobQueue, worker: str = "w1", kinds: list[str] | None = None) -> Job:
    """Claim a job that must be there."""
    job = queue.claim(worker, kinds)
    assert job is not None
    return job


def event_types(queue: JobQueue, job_id: int) -> list[str]:
    """The types of a job's events, oldest first."""
    return [e.type for e in queue.events_since(job_id)]


def chain(queue: JobQueue) -> tuple[Job, Job, Job]:
    """ingest -> synthesize -> train_km; the later steps outrank the first so that only dependencies order them."""
    ingest = queue.enqueue("ingest", max_attempts=1)
    synthesize = queue.enqueue("synthesize", depends_on=ingest.id, priority=9)
    train = queue.enqueue("train_km", depends_on=synthesize.id, priority=9)
    return ingest, synthesize, train


WORKER_OPERATIONS: dict[str, Callable[[JobQueue, int, str], object]] = {
    "heartbeat": lambda q, job_id, worker: q.heartbeat(job_id, worker),
    "progress": lambda q, job_id, worker: q.progress(job_id, worker, 0.5),
    "complete": lambda q, job_id, worker: q.complete(job_id, worker),
    "fail": lambda q, job_id, worker: q.fail(job_id, worker, "boom"),
    "mark_cancelled": lambda q, job_id, worker: q.mark_cancelled(job_id, worker),
}
