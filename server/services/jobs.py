"""Jobs as one tenant sees them: read, cancel, retry, start training jobs, and follow a job's events."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func, select

from registry.db import transaction, write_transaction
from registry.documents import get_document
from registry.models import Job, JobEvent, JobStatus
from registry.queue import JobQueue, JobSpec
from registry.tenancy import Reach, owned
from server.limits import JobQuota, training_jobs
from server.metrics import ServerMetrics
from server.schemas.jobs import JobEventPublic, JobPublic, JobsPublic, TrainJobCreate
from server.sse import format_event
from server.state import AppState

END_EVENT = "end"
EVENTS_PER_POLL = 500
# Payload lists whose records name documents (train_ke `qa`, compressor/reranker/reasoner `items`).
DOCUMENT_RECORD_LISTS = ("qa", "items")


class JobService:
    """Reads and commands on the queue, each checked against the caller's reach (another tenant's job is 404)."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._queue = state.queue
        self._quota = JobQuota.from_settings(state.settings)

    def get(self, job_id: int, tenant: Reach) -> JobPublic:
        """The job, if it is the tenant's."""
        return JobPublic.model_validate(self._owned(job_id, tenant))

    def cancel(self, job_id: int, tenant: Reach) -> JobPublic:
        """Cancel a queued job, or ask the worker of a running one to stop; 409 once it has ended."""
        self._owned(job_id, tenant)
        return JobPublic.model_validate(self._queue.cancel(job_id))

    def retry(self, job_id: int, tenant: Reach) -> JobPublic:
        """Queue a failed or cancelled job again (with the dependents its end cancelled), within the job quota."""
        owner = self._owned(job_id, tenant).tenant
        return JobPublic.model_validate(self._queue.retry(job_id, guard=self._quota.requeue_guard(owner)))

    def list_jobs(self, tenant: Reach, *, status: JobStatus | None, kind: str | None, document_id: int | None,
             limit: int, offset: int) -> JobsPublic:
        """A page of the tenant's jobs (None: every tenant's), newest first, and how many match."""
        jobs = self._queue.list(status=status, kind=kind, tenant=tenant, document_id=document_id,
                                limit=limit, offset=offset)
        filters = {"status": status, "kind": kind, "tenant": tenant, "document_id": document_id}
        stmt = select(func.count()).select_from(Job).filter_by(**{k: v for k, v in filters.items() if v is not None})
        with transaction(self._state.sessions) as session:
            total = session.scalar(stmt) or 0
        return JobsPublic(data=[JobPublic.model_validate(job) for job in jobs], count=total)

    def submit_training(self, body: TrainJobCreate, tenant: str) -> JobPublic:
        """Queue a training job; every document it names (its own, and its records') must be the tenant's."""
        named = ([body.document_id] if body.document_id is not None else []) + payload_document_ids(body.payload)
        with transaction(self._state.sessions) as session:
            for document_id in dict.fromkeys(named):
                get_document(session, document_id, tenant=tenant)
        spec = JobSpec(body.kind, dict(body.payload), tenant=tenant, document_id=body.document_id)
        with write_transaction(self._state.sessions) as session:
            self._quota.ensure_room(session, tenant, training_jobs([body.kind]))
            (job,) = self._queue.add_chain(session, [spec])
            return JobPublic.model_validate(job)

    def feed(self, job_id: int, tenant: Reach, after: int) -> JobEventFeed:
        """A cursor over the job's events after event id `after`."""
        self._owned(job_id, tenant)
        return JobEventFeed(self._queue, job_id, after)

    def _owned(self, job_id: int, tenant: Reach) -> Job:
        return owned(self._queue.get(job_id), tenant, "job", job_id)


def payload_document_ids(payload: dict[str, Any]) -> list[int]:
    """The document ids named by a training payload's inline records (the worker re-checks them too)."""
    ids: list[int] = []
    for key in DOCUMENT_RECORD_LISTS:
        records = payload.get(key)
        if isinstance(records, list):
            ids += [r["document_id"] for r in records if isinstance(r, dict) and isinstance(r.get("document_id"), int)]
    return ids


class JobEventFeed:
    """A job's events as server-sent events, from a cursor on; the last one, `end`, carries the final job."""

    def __init__(self, queue: JobQueue, job_id: int, after: int) -> None:
        self._queue = queue
        self._job_id = job_id
        self.last_id = after

    async def poll(self) -> tuple[list[str], bool]:
        """The events since the last poll, formatted, and whether the job has ended (then `end` is included)."""
        job, events = await asyncio.to_thread(self._read)
        chunks = [format_event(event_data(event), event=event.type, event_id=event.id) for event in events]
        if events:
            self.last_id = events[-1].id
        # A final status read before the events means every event of the job is in this batch or an earlier one.
        done = job.status.is_final and len(events) < EVENTS_PER_POLL
        if done:
            chunks.append(format_event(JobPublic.model_validate(job).model_dump(mode="json"), event=END_EVENT))
        return chunks, done

    def _read(self) -> tuple[Job, list[JobEvent]]:
        job = self._queue.get(self._job_id)
        return job, self._queue.events_since(self._job_id, self.last_id, limit=EVENTS_PER_POLL)


def event_data(event: JobEvent) -> dict[str, Any]:
    """The `data:` of one job event."""
    return JobEventPublic.model_validate(event).model_dump(mode="json")


def refresh_queue_metrics(state: AppState, metrics: ServerMetrics) -> None:
    """Set the `kmserve_jobs{status}` gauge from the queue's current counts (call before rendering /metrics)."""
    for status, count in state.queue.stats().items():
        metrics.queue_depth.labels(status).set(count)
