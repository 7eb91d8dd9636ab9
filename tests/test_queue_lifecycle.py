"""The job queue's lifecycle on SQLite and PostgreSQL: dependencies, cancellation, expired leases, admin retry."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import JobStateError, LeaseLostError
from registry.models import JobStatus
from registry.queue import JobQueue
from registry.queue_types import (
    MSG_DEPENDENCY_ENDED,
    MSG_DEPENDENCY_OF_RETRY,
    MSG_LEASE_EXPIRED,
    MSG_NO_CANCEL_REQUESTED,
    MSG_NOT_CANCELLABLE,
    MSG_NOT_RETRYABLE,
)
from tests.queue_helpers import LEASE, WORKER_OPERATIONS, FakeClock, chain, claim, event_types


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(session_factory: sessionmaker[Session], clock: FakeClock) -> JobQueue:
    return JobQueue(session_factory, lease_seconds=LEASE, backoff_seconds=5, max_backoff_seconds=12, clock=clock)


# -- dependencies --------------------------------------------------------------------------------------------


def test_a_chain_runs_in_order(queue: JobQueue) -> None:
    jobs = chain(queue)
    for expected in jobs:
        job = claim(queue)
        assert job.id == expected.id
        assert queue.claim("w2") is None  # the next one waits until this one succeeds
        queue.complete(job.id, "w1")
    assert {queue.get(j.id).status for j in jobs} == {JobStatus.SUCCEEDED}


def test_a_failed_dependency_cancels_its_dependents(queue: JobQueue) -> None:
    ingest, synthesize, train = chain(queue)
    claim(queue)
    queue.fail(ingest.id, "w1", "unreadable")
    synthesize, train = queue.get(synthesize.id), queue.get(train.id)
    assert (synthesize.status, train.status) == (JobStatus.CANCELLED, JobStatus.CANCELLED)
    assert synthesize.error == MSG_DEPENDENCY_ENDED.format(job_id=ingest.id, status="failed")
    assert train.error == MSG_DEPENDENCY_ENDED.format(job_id=synthesize.id, status="cancelled")
    assert queue.events_since(train.id)[-1].data["dependency_id"] == synthesize.id
    assert queue.claim("w1") is None


def test_cancelling_a_queued_dependency_cancels_its_dependents(queue: JobQueue) -> None:
    ingest, synthesize, train = chain(queue)
    assert queue.cancel(ingest.id).status == JobStatus.CANCELLED
    assert queue.get(train.id).status == JobStatus.CANCELLED
    assert f"dependency job {ingest.id} cancelled" in (queue.get(synthesize.id).error or "")


def test_a_job_on_a_succeeded_dependency_is_claimable_at_once(queue: JobQueue) -> None:
    ingest = queue.enqueue("ingest")
    queue.complete(claim(queue).id, "w1")
    synthesize = queue.enqueue("synthesize", depends_on=ingest.id)
    assert claim(queue).id == synthesize.id


# -- cancel --------------------------------------------------------------------------------------------------


def test_cancel_of_a_running_job_is_confirmed_by_its_worker(queue: JobQueue) -> None:
    job = queue.enqueue("train_km")
    follower = queue.enqueue("index", depends_on=job.id)
    claim(queue)
    requested = queue.cancel(job.id)
    assert (requested.status, requested.cancel_requested) == (JobStatus.RUNNING, True)
    queue.cancel(job.id)  # asking twice records one request
    assert queue.heartbeat(job.id, "w1").cancel_requested
    assert queue.progress(job.id, "w1", 0.3).cancel_requested
    assert queue.mark_cancelled(job.id, "w1").status == JobStatus.CANCELLED
    assert event_types(queue, job.id) == ["queued", "claimed", "cancel_requested", "progress", "cancelled"]
    assert queue.get(follower.id).status == JobStatus.CANCELLED


def test_mark_cancelled_without_a_request_is_refused(queue: JobQueue) -> None:
    job = queue.enqueue("ingest")
    claim(queue)
    with pytest.raises(JobStateError, match=re.escape(MSG_NO_CANCEL_REQUESTED)):
        queue.mark_cancelled(job.id, "w1")


@pytest.mark.parametrize("finish", ["complete", "fail"])
def test_cancel_of_a_finished_job_is_refused(queue: JobQueue, finish: str) -> None:
    job = queue.enqueue("ingest", max_attempts=1)
    claim(queue)
    WORKER_OPERATIONS[finish](queue, job.id, "w1")
    with pytest.raises(JobStateError, match=re.escape(MSG_NOT_CANCELLABLE)):
        queue.cancel(job.id)


def test_a_failure_while_cancel_is_pending_is_not_retried(queue: JobQueue) -> None:
    job = queue.enqueue("ingest", max_attempts=5)
    claim(queue)
    queue.cancel(job.id)
    ended = queue.fail(job.id, "w1", "interrupted")
    assert (ended.status, ended.error) == (JobStatus.CANCELLED, "interrupted")


# -- expired leases ------------------------------------------------------------------------------------------


def test_an_expired_lease_is_reclaimed_by_another_worker(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("train_km")
    claim(queue, "w1")
    clock.advance(LEASE)
    assert queue.claim("w2") is None  # expires strictly after the lease time
    clock.advance(0.001)
    reclaimed = claim(queue, "w2")
    assert (reclaimed.id, reclaimed.lease_owner, reclaimed.attempts) == (job.id, "w2", 2)
    events = queue.events_since(job.id)
    assert [e.type for e in events] == ["queued", "claimed", "reclaimed", "claimed"]
    assert events[2].data == {"previous_owner": "w1", "attempts": 1}
    with pytest.raises(LeaseLostError):
        queue.heartbeat(job.id, "w1")
    assert queue.complete(job.id, "w2").status == JobStatus.SUCCEEDED


def test_an_expired_lease_with_no_attempts_left_fails(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("train_km", max_attempts=1)
    follower = queue.enqueue("index", depends_on=job.id)
    other = queue.enqueue("ingest", priority=-1)
    claim(queue, "w1")
    clock.advance(LEASE + 1)
    assert claim(queue, "w2").id == other.id  # the spent job is failed on the way, not handed out
    failed = queue.get(job.id)
    assert (failed.status, failed.error, failed.finished_at) == (JobStatus.FAILED, MSG_LEASE_EXPIRED, clock.now)
    assert queue.get(follower.id).status == JobStatus.CANCELLED


def test_an_expired_lease_with_a_pending_cancel_is_cancelled(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("train_km", max_attempts=3)
    claim(queue, "w1")
    queue.cancel(job.id)
    clock.advance(LEASE + 1)
    assert queue.claim("w2") is None
    assert queue.get(job.id).status == JobStatus.CANCELLED


def test_a_late_worker_may_still_renew_an_expired_unclaimed_lease(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue("train_km")
    claim(queue, "w1")
    clock.advance(LEASE + 5)
    assert queue.heartbeat(job.id, "w1").lease_expires_at == clock.now + timedelta(seconds=LEASE)
    assert queue.claim("w2") is None


# -- retry by an admin ---------------------------------------------------------------------------------------


def test_retry_requeues_a_failed_job_and_the_dependents_it_cancelled(queue: JobQueue, clock: FakeClock) -> None:
    ingest, synthesize, train = chain(queue)
    unrelated = queue.enqueue("train_km", depends_on=synthesize.id)
    queue.cancel(unrelated.id)  # cancelled by a person, not by the failure: stays cancelled
    claim(queue)
    queue.fail(ingest.id, "w1", "unreadable")
    clock.advance(60)
    retried = queue.retry(ingest.id)
    assert (retried.status, retried.attempts, retried.error, retried.run_after) == (
        JobStatus.QUEUED, 0, None, clock.now)
    assert {queue.get(j.id).status for j in (synthesize, train)} == {JobStatus.QUEUED}
    assert queue.get(unrelated.id).status == JobStatus.CANCELLED
    assert queue.events_since(ingest.id)[-1].data == {"retry": True}
    for expected in (ingest, synthesize, train):
        assert queue.complete(claim(queue).id, "w1").id == expected.id


@pytest.mark.parametrize("state", ["queued", "running", "succeeded"])
def test_retry_of_a_job_that_did_not_fail_is_refused(queue: JobQueue, state: str) -> None:
    job = queue.enqueue("ingest")
    if state != "queued":
        claim(queue)
    if state == "succeeded":
        queue.complete(job.id, "w1")
    with pytest.raises(JobStateError, match=re.escape(MSG_NOT_RETRYABLE)):
        queue.retry(job.id)


def test_retry_of_a_job_whose_dependency_failed_is_refused(queue: JobQueue) -> None:
    ingest, synthesize, _ = chain(queue)
    claim(queue)
    queue.fail(ingest.id, "w1", "unreadable")
    expected = MSG_DEPENDENCY_OF_RETRY.format(job_id=ingest.id, status="failed")
    with pytest.raises(JobStateError, match=re.escape(expected)):
        queue.retry(synthesize.id)




def test_chain_runs_in_order_and_commits_with_the_callers_work(session_factory: sessionmaker[Session]) -> None:
    from registry.db import write_transaction
    from registry.queue import JobSpec
    from tests.factories import make_document

    queue = JobQueue(session_factory)
    with write_transaction(session_factory) as session:
        document = make_document(session)
        chain = queue.add_chain(session, [JobSpec("ingest", document_id=document.id), JobSpec("synthesize"),
                                          JobSpec("train_km")])
    assert [j.depends_on_id for j in chain] == [None, chain[0].id, chain[1].id]
    order = []
    for _ in range(3):
        job = queue.claim("w")
        assert job is not None
        assert queue.claim("other") is None  # the next link waits for this one
        order.append(job.kind)
        queue.complete(job.id, "w")
    assert order == ["ingest", "synthesize", "train_km"]


def test_chain_rolls_back_with_the_caller(session_factory: sessionmaker[Session]) -> None:
    from registry.db import write_transaction
    from registry.queue import JobSpec

    queue = JobQueue(session_factory)
    before = sum(queue.stats().values())

    def upload_that_fails() -> None:
        with write_transaction(session_factory) as session:
            queue.add_chain(session, [JobSpec("ingest"), JobSpec("train_km")])
            raise RuntimeError("the document insert failed")

    with pytest.raises(RuntimeError):
        upload_that_fails()
    assert sum(queue.stats().values()) == before
