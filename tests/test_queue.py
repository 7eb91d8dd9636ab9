"""The job queue's basic operations on SQLite and PostgreSQL: enqueue, claim, report, finish, read."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.errors import JobStateError, LeaseLostError, NotFoundError
from registry.models import Document, JobStatus
from registry.queue import HeartbeatResult, JobQueue, JobSpec
from registry.queue_types import MSG_DEPENDENCY_DEAD, MSG_PROGRESS
from tests.queue_helpers import LEASE, WORKER_OPERATIONS, FakeClock, claim, event_types


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(session_factory: sessionmaker[Session], clock: FakeClock) -> JobQueue:
    return JobQueue(session_factory, lease_seconds=LEASE, backoff_seconds=5, max_backoff_seconds=12, clock=clock)


# -- enqueue -------------------------------------------------------------------------------------------------


def test_enqueue_stores_a_queued_job_and_a_queued_event(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("ingest", {"path": "a.txt"}, priority=3, max_attempts=5, tenant="acme")

    stored = queue.get(job.id)
    assert (stored.kind, stored.payload, stored.priority, stored.max_attempts) == ("ingest", {"path": "a.txt"}, 3, 5)
    assert (stored.status, stored.attempts, stored.tenant) == (JobStatus.QUEUED, 0, "acme")
    assert stored.created_at == stored.run_after == clock.now
    assert event_types(queue, job.id) == ["queued"]


def test_enqueue_defaults_attempts_to_the_queue_setting(session_factory: sessionmaker[Session]) -> None:
    job = JobQueue(session_factory, max_attempts=7).enqueue("ingest")
    assert job.max_attempts == 7


def test_from_settings_takes_the_job_settings(session_factory: sessionmaker[Session], clock: FakeClock) -> None:
    settings = Settings(job_lease_seconds=7.0, job_max_attempts=2, job_retry_backoff_seconds=1.5)
    queue = JobQueue.from_settings(session_factory, settings, clock=clock)
    job = queue.enqueue("ingest")
    assert claim(queue).lease_expires_at == clock.now + timedelta(seconds=7)
    assert queue.fail(job.id, "w1", "x").run_after == clock.now + timedelta(seconds=1.5)
    assert job.max_attempts == 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": ""}, "kind"), ({"kind": "k" * 65}, "kind"), ({"kind": "x", "max_attempts": 0}, "max_attempts"),
])
def test_enqueue_rejects_bad_arguments(queue: JobQueue, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        queue.enqueue(**kwargs)


def test_enqueue_with_unknown_dependency_is_not_found(queue: JobQueue) -> None:
    with pytest.raises(NotFoundError, match="job 999999 was not found"):
        queue.enqueue("synthesize", depends_on=999_999)


def test_enqueue_on_a_failed_dependency_is_refused(queue: JobQueue) -> None:
    ingest = queue.enqueue("ingest", max_attempts=1)
    queue.fail(claim(queue).id, "w1", "boom")
    with pytest.raises(JobStateError, match=re.escape(MSG_DEPENDENCY_DEAD)):
        queue.enqueue("synthesize", depends_on=ingest.id)


def test_enqueue_many_is_all_or_nothing(queue: JobQueue) -> None:
    specs = [JobSpec("ingest"), JobSpec("synthesize", depends_on=999_999)]
    with pytest.raises(NotFoundError):
        queue.enqueue_many(specs)
    assert queue.list() == []
    assert [j.kind for j in queue.enqueue_many(specs[:1] * 3)] == ["ingest"] * 3


def test_payload_and_metrics_with_nan_are_stored_as_strings(queue: JobQueue) -> None:
    job = queue.enqueue("train_km", {"lr": float("inf")})
    queue.progress(claim(queue).id, "w1", 0.5, metrics={"loss": float("nan"), "hist": [1.0, float("-inf")]})
    stored = queue.get(job.id)
    assert stored.payload == {"lr": "inf"}
    assert stored.metrics == {"loss": "nan", "hist": [1.0, "-inf"]}


# -- claim ---------------------------------------------------------------------------------------------------


def test_claim_on_an_empty_queue_returns_none(queue: JobQueue) -> None:
    assert queue.claim("w1") is None


def test_claim_leases_the_job(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("ingest")
    claimed = claim(queue, "worker-a")
    assert claimed.id == job.id
    assert (claimed.status, claimed.lease_owner, claimed.attempts) == (JobStatus.RUNNING, "worker-a", 1)
    assert claimed.lease_expires_at == clock.now + timedelta(seconds=LEASE)
    assert claimed.started_at == claimed.heartbeat_at == clock.now
    events = queue.events_since(job.id)
    assert [(e.type, e.data) for e in events][1] == ("claimed", {"worker": "worker-a", "attempt": 1})
    assert queue.claim("worker-b") is None


def test_claim_takes_higher_priority_first_then_oldest(queue: JobQueue) -> None:
    low, high_old, high_new = (queue.enqueue("k", priority=p) for p in (0, 5, 5))
    assert [claim(queue).id for _ in range(3)] == [high_old.id, high_new.id, low.id]


def test_claim_filters_by_kinds(queue: JobQueue) -> None:
    ingest = queue.enqueue("ingest")
    train = queue.enqueue("train_km")
    assert queue.claim("w1", []) is None
    assert claim(queue, kinds=["train_km", "synthesize"]).id == train.id
    assert queue.claim("w1", ["train_km"]) is None
    assert claim(queue, kinds=["ingest"]).id == ingest.id


def test_claim_rejects_a_bad_worker_id(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="worker_id"):
        queue.claim("")
    with pytest.raises(ValueError, match="worker_id"):
        queue.claim("w" * 129)


def test_returned_jobs_are_detached_and_loaded(session_factory: sessionmaker[Session]) -> None:
    expiring = sessionmaker(**{**session_factory.kw, "expire_on_commit": True})
    queue = JobQueue(expiring)
    job = queue.enqueue("ingest", {"a": 1})
    assert inspect(job).detached
    assert (job.kind, job.payload, job.status) == ("ingest", {"a": 1}, JobStatus.QUEUED)


# -- heartbeat, progress, lease ownership --------------------------------------------------------------------


def test_heartbeat_extends_the_lease(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("ingest")
    claim(queue)
    clock.advance(20)
    beat = queue.heartbeat(job.id, "w1")
    assert beat == HeartbeatResult(job.id, clock.now + timedelta(seconds=LEASE), cancel_requested=False)
    clock.advance(LEASE - 1)  # past the first lease, within the renewed one
    assert queue.claim("w2") is None
    assert queue.get(job.id).heartbeat_at == clock.now - timedelta(seconds=LEASE - 1)


@pytest.mark.parametrize("operation", WORKER_OPERATIONS)
def test_worker_operations_need_the_lease(queue: JobQueue, operation: str) -> None:
    act = WORKER_OPERATIONS[operation]
    job = queue.enqueue("ingest")
    with pytest.raises(LeaseLostError, match=f"job {job.id} is no longer leased to w1"):
        act(queue, job.id, "w1")  # queued: nobody holds it
    claim(queue, "w1")
    with pytest.raises(LeaseLostError):
        act(queue, job.id, "intruder")
    queue.complete(job.id, "w1")
    with pytest.raises(LeaseLostError):
        act(queue, job.id, "w1")  # finished
    with pytest.raises(NotFoundError):
        act(queue, 999_999, "w1")


def test_progress_records_message_and_merges_metrics(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("train_km")
    claim(queue)
    queue.progress(job.id, "w1", 0.25, "step 1", {"loss": 2.0, "lr": 1e-3})
    clock.advance(5)
    beat = queue.progress(job.id, "w1", 0.5, metrics={"loss": 1.5})
    stored = queue.get(job.id)
    assert (stored.progress, stored.message, stored.metrics) == (0.5, "step 1", {"loss": 1.5, "lr": 1e-3})
    assert beat.lease_expires_at == stored.lease_expires_at == clock.now + timedelta(seconds=LEASE)
    progress = [e.data for e in queue.events_since(job.id) if e.type == "progress"]
    assert progress[-1] == {"progress": 0.5, "message": "step 1", "metrics": {"loss": 1.5}}


@pytest.mark.parametrize(("given", "stored"), [(-0.5, 0.0), (1.7, 1.0), (1, 1.0)])
def test_progress_is_clamped(queue: JobQueue, given: float, stored: float) -> None:
    job = queue.enqueue("train_km")
    claim(queue)
    queue.progress(job.id, "w1", given)
    assert queue.get(job.id).progress == stored


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "0.5"])
def test_progress_refuses_non_numbers(queue: JobQueue, bad: Any) -> None:
    job = queue.enqueue("train_km")
    claim(queue)
    with pytest.raises(ValueError, match=re.escape(MSG_PROGRESS.split("{")[0])):
        queue.progress(job.id, "w1", bad)


def test_progress_events_are_throttled(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("train_km")
    claim(queue)
    for step in range(10):
        queue.progress(job.id, "w1", step / 10, f"step {step}")
        clock.advance(0.3)  # 10 reports over 3 s: one event per second of reports
    assert event_types(queue, job.id).count("progress") == 3
    assert queue.get(job.id).message == "step 9"


# -- complete, fail, backoff ---------------------------------------------------------------------------------


def test_complete_records_the_result(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("ingest")
    claim(queue)
    clock.advance(3)
    done = queue.complete(job.id, "w1", {"chunks": 12})
    assert (done.status, done.result, done.progress, done.finished_at) == (
        JobStatus.SUCCEEDED, {"chunks": 12}, 1.0, clock.now)
    assert done.lease_expires_at is None
    assert event_types(queue, job.id) == ["queued", "claimed", "succeeded"]


def test_fail_retries_with_capped_exponential_backoff(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("train_km", max_attempts=4)
    for attempt, delay in [(1, 5), (2, 10), (3, 12)]:  # base 5 s doubling, capped at 12 s
        assert claim(queue).attempts == attempt
        failed = queue.fail(job.id, "w1", f"oom {attempt}")
        assert (failed.status, failed.error, failed.lease_owner) == (JobStatus.QUEUED, f"oom {attempt}", None)
        assert failed.run_after == clock.now + timedelta(seconds=delay)
        clock.advance(delay - 0.001)
        assert queue.claim("w1") is None  # not before its backoff ends
        clock.advance(0.001)
    claim(queue)
    final = queue.fail(job.id, "w1", "oom 4")
    assert (final.status, final.error, final.attempts, final.finished_at) == (
        JobStatus.FAILED, "oom 4", 4, clock.now)
    assert event_types(queue, job.id).count("retry_scheduled") == 3
    assert queue.events_since(job.id)[-1].data == {"error": "oom 4"}


def test_fail_not_retryable_fails_at_once(queue: JobQueue) -> None:
    job = queue.enqueue("ingest", max_attempts=5)
    claim(queue)
    assert queue.fail(job.id, "w1", "corrupt pdf", retryable=False).status == JobStatus.FAILED


def test_success_after_a_retry_clears_the_error(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("ingest")
    claim(queue)
    queue.fail(job.id, "w1", "flaky")
    clock.advance(5)
    claim(queue)
    assert queue.complete(job.id, "w1").error is None


# -- reading -------------------------------------------------------------------------------------------------


def test_unknown_jobs_are_not_found(queue: JobQueue) -> None:
    for read in (queue.get, queue.cancel, queue.retry, queue.events_since):
        with pytest.raises(NotFoundError, match="job 424242 was not found"):
            read(424_242)


def test_list_filters_newest_first_with_paging(queue: JobQueue, session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session, session.begin():
        document = Document(title="t", content_hash="c" * 64)
        session.add(document)
    a = queue.enqueue("ingest", tenant="acme", document_id=document.id)
    b = queue.enqueue("train_km", tenant="acme", document_id=document.id)
    c = queue.enqueue("ingest")
    claim(queue)  # takes a
    assert [j.id for j in queue.list()] == [c.id, b.id, a.id]
    assert [j.id for j in queue.list(kind="ingest")] == [c.id, a.id]
    assert [j.id for j in queue.list(tenant="acme", status=JobStatus.QUEUED)] == [b.id]
    assert [j.id for j in queue.list(document_id=document.id, limit=1, offset=1)] == [a.id]
    with pytest.raises(ValueError, match="limit"):
        queue.list(limit=0)


def test_events_since_follows_a_job(queue: JobQueue) -> None:
    job = queue.enqueue("ingest")
    seen = queue.events_since(job.id)
    claim(queue)
    queue.complete(job.id, "w1")
    later = queue.events_since(job.id, after_id=seen[-1].id)
    assert [e.type for e in later] == ["claimed", "succeeded"]
    assert later[0].id > seen[-1].id
    assert [e.type for e in queue.events_since(job.id, limit=1)] == ["queued"]


def test_stats_counts_jobs_by_status(queue: JobQueue) -> None:
    assert queue.stats() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    for _ in range(3):
        queue.enqueue("ingest", max_attempts=1)
    queue.complete(claim(queue).id, "w1")
    queue.fail(claim(queue).id, "w1", "x")
    assert queue.stats() == {"queued": 1, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}


