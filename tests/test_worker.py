"""The trainer worker loop on a real database: how each way a handler ends settles its job, and signals.

The handlers are the small real functions of tests/worker_proc.py; the worker, queue and database are the real ones.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from clients.cli import app as cli_app
from clients.cli import embedded_app
from registry.config import Settings
from registry.db import make_engine, make_session_factory
from registry.errors import LeaseLostError
from registry.models import Job, JobStatus
from registry.queue import JobQueue
from registry.queue_types import MSG_RELEASED_WHILE_CANCELLING, JobEventType
from tests.worker_proc import (
    REJECTED,
    STEP_FILE,
    TEST_HANDLERS,
    fast_config,
    read_step,
    succeed,
    worker_settings,
)
from trainer_worker.handlers import MSG_UNKNOWN_KIND, HandlerTable
from trainer_worker.worker import Outcome, Worker, WorkerSetupError, WorkerThread, build_worker

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_SCRIPT = Path(__file__).with_name("worker_proc.py")
BOTH_DATABASES = pytest.mark.parametrize(
    "fresh_db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def settings(fresh_db_url: str, tmp_path: Path) -> Settings:
    return worker_settings(fresh_db_url, tmp_path / "data")


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def queue(sessions: sessionmaker[Session], settings: Settings) -> JobQueue:
    return JobQueue.from_settings(sessions, settings)


def make_worker(settings: Settings, **config: object) -> Worker:
    return build_worker(settings, handlers=HandlerTable(TEST_HANDLERS), config=fast_config(**config))


def run_once(settings: Settings, **config: object) -> Worker:
    worker = make_worker(settings, once=True, **config)
    try:
        worker.run()
    finally:
        worker.close()
    return worker


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def event_types(queue: JobQueue, job_id: int) -> list[str]:
    return [event.type for event in queue.events_since(job_id)]


def lines(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


class Background:
    """A worker running on a thread of the test, stopped and joined at the end."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = WorkerThread(worker)
        self.thread.start()

    def join(self, timeout: float = 20.0) -> None:
        assert self.thread.stop(timeout), "the worker did not stop"


# -- how a handler's end settles its job --------------------------------------------------------------------


@BOTH_DATABASES
def test_success_completes_with_result_progress_and_events(settings: Settings, queue: JobQueue) -> None:
    job = queue.enqueue("succeed", {"value": 7})
    worker = run_once(settings)
    done = queue.get(job.id)
    assert worker.stats.outcomes == {Outcome.SUCCEEDED: 1}
    assert (done.status, done.result, done.progress, done.attempts) == (JobStatus.SUCCEEDED, {"echo": 7}, 1.0, 1)
    assert done.metrics == {"loss": [1.0, 0.5]} and done.message == "half way"
    assert event_types(queue, job.id) == ["queued", "claimed", "progress", "succeeded"]
    assert done.lease_owner == worker.worker_id and worker.worker_id.count(":") == 2


@BOTH_DATABASES
def test_failures_retry_with_backoff_then_fail_with_the_error(settings: Settings, queue: JobQueue) -> None:
    job = queue.enqueue("always_fail", {"message": "disk on fire"})
    worker = make_worker(settings, max_jobs=3)
    worker.run()
    worker.close()
    failed = queue.get(job.id)
    assert worker.stats.outcomes == {Outcome.RETRY_SCHEDULED: 2, Outcome.FAILED: 1}
    assert (failed.status, failed.attempts, failed.error) == (JobStatus.FAILED, 3, "RuntimeError: disk on fire")
    retries = [e.data for e in queue.events_since(job.id) if e.type == "retry_scheduled"]
    assert [r["delay_seconds"] for r in retries] == [0.05, 0.1]
    assert event_types(queue, job.id)[-1] == "failed"


def test_permanent_error_fails_at_once(settings: Settings, queue: JobQueue) -> None:
    job = queue.enqueue("reject")
    run_once(settings)
    failed = queue.get(job.id)
    assert (failed.status, failed.attempts, failed.error) == (JobStatus.FAILED, 1, REJECTED)


def test_unknown_kind_fails_permanently_naming_the_known_ones(settings: Settings, queue: JobQueue) -> None:
    job = queue.enqueue("mystery")
    run_once(settings)
    failed = queue.get(job.id)
    known = ", ".join(sorted(TEST_HANDLERS))
    assert (failed.status, failed.attempts) == (JobStatus.FAILED, 1)
    assert failed.error == MSG_UNKNOWN_KIND.format(kind="mystery", known=known)


def test_handler_that_cannot_be_imported_fails_permanently(settings: Settings, queue: JobQueue) -> None:
    job = queue.enqueue("broken")
    worker = build_worker(settings, handlers=HandlerTable({"broken": "tests.no_such_module:run"}),
                          config=fast_config(once=True))
    worker.run()
    worker.close()
    failed = queue.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.attempts == 1
    assert failed.error is not None and "tests.no_such_module:run" in failed.error


def test_kinds_filter_leaves_other_jobs_queued(settings: Settings, queue: JobQueue) -> None:
    other, mine = queue.enqueue("reject"), queue.enqueue("succeed")
    run_once(settings, kinds=("succeed",))
    assert queue.get(mine.id).status == JobStatus.SUCCEEDED
    assert queue.get(other.id).status == JobStatus.QUEUED


# -- cancel, heartbeat, lease ---------------------------------------------------------------------------------


@BOTH_DATABASES
def test_cancel_stops_a_reporting_job_within_one_step(settings: Settings, queue: JobQueue, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    job = queue.enqueue("report_steps", {"trace": str(trace), "step_seconds": 0.02})
    background = Background(make_worker(settings, max_jobs=1))
    wait_for(lambda: lines(trace) >= 3, 20, "the handler to take steps")
    queue.cancel(job.id)
    steps_at_cancel = lines(trace)
    background.join()
    assert queue.get(job.id).status == JobStatus.CANCELLED
    # Only a step whose report went through before the cancel may still be traced.
    assert lines(trace) <= steps_at_cancel + 1
    assert background.worker.stats.outcomes == {Outcome.CANCELLED: 1}


def test_heartbeat_sees_a_cancel_while_the_handler_only_checks(fresh_db_url: str, tmp_path: Path) -> None:
    settings = worker_settings(fresh_db_url, tmp_path / "data", lease=0.6)
    engine = make_engine(fresh_db_url)
    queue = JobQueue.from_settings(make_session_factory(engine), settings)
    job = queue.enqueue("check_steps")
    background = Background(make_worker(settings, max_jobs=1))
    wait_for(lambda: queue.get(job.id).status == JobStatus.RUNNING, 20, "the job to start")
    queue.cancel(job.id)
    started = time.monotonic()
    background.join()
    assert queue.get(job.id).status == JobStatus.CANCELLED
    assert time.monotonic() - started < 2.0  # a heartbeat (every 0.2 s) carried the cancel
    engine.dispose()


def test_heartbeat_keeps_the_lease_through_steps_longer_than_it(fresh_db_url: str, tmp_path: Path) -> None:
    settings = worker_settings(fresh_db_url, tmp_path / "data", lease=0.5)
    engine = make_engine(fresh_db_url)
    queue = JobQueue.from_settings(make_session_factory(engine), settings)
    job = queue.enqueue("check_steps", {"steps": 60, "step_seconds": 0.025})  # 1.5 s: three leases long
    worker = make_worker(settings, once=True)
    worker.run()
    worker.close()
    assert queue.get(job.id).status == JobStatus.SUCCEEDED
    assert "reclaimed" not in event_types(queue, job.id)
    engine.dispose()


def test_a_job_reclaimed_meanwhile_is_left_to_its_new_owner(fresh_db_url: str, tmp_path: Path) -> None:
    settings = worker_settings(fresh_db_url, tmp_path / "data", lease=0.3)
    engine = make_engine(fresh_db_url)
    queue = JobQueue.from_settings(make_session_factory(engine), settings)
    job = queue.enqueue("check_steps", {"steps": 40, "step_seconds": 0.025})
    # No heartbeat within the run: the lease lapses and another worker takes the job over.
    background = Background(make_worker(settings, max_jobs=1, heartbeat_seconds=60.0))
    wait_for(lambda: queue.get(job.id).lease_owner == background.worker.worker_id, 20, "the job to start")
    wait_for(lambda: queue.claim("other-worker") is not None, 20, "the lease to lapse")
    background.join()
    taken = queue.get(job.id)
    assert background.worker.stats.outcomes == {Outcome.LEASE_LOST: 1}
    assert (taken.status, taken.lease_owner) == (JobStatus.RUNNING, "other-worker")
    engine.dispose()


def test_an_idle_worker_stops_promptly(settings: Settings) -> None:
    background = Background(make_worker(settings, max_poll_seconds=5.0))
    time.sleep(0.3)
    started = time.monotonic()
    background.join()
    assert time.monotonic() - started < 1.0


# -- release ------------------------------------------------------------------------------------------------


@BOTH_DATABASES
def test_release_queues_the_job_again_returning_its_attempt(
    queue: JobQueue, sessions: sessionmaker[Session]
) -> None:
    job = queue.enqueue("succeed")
    queue.claim("w1")
    queue.progress(job.id, "w1", 0.4)
    released = queue.release(job.id, "w1")
    assert (released.status, released.lease_owner, released.lease_expires_at) == (JobStatus.QUEUED, None, None)
    assert released.attempts == 0 and released.progress == 0.4
    last = queue.events_since(job.id)[-1]
    assert (last.type, last.data["worker"], last.data["attempts"]) == (JobEventType.RELEASED, "w1", 0)
    assert _claimed(queue, "w2").id == job.id  # claimable at once
    with pytest.raises(LeaseLostError):
        queue.release(job.id, "w1")


def test_release_with_a_pending_cancel_ends_the_job_cancelled(
    queue: JobQueue, sessions: sessionmaker[Session]
) -> None:
    job = queue.enqueue("succeed")
    dependent = queue.enqueue("succeed", depends_on=job.id)
    queue.claim("w1", ["succeed"])
    queue.cancel(job.id)
    ended = queue.release(job.id, "w1")
    assert (ended.status, ended.error) == (JobStatus.CANCELLED, MSG_RELEASED_WHILE_CANCELLING)
    assert queue.get(dependent.id).status == JobStatus.CANCELLED


def _claimed(queue: JobQueue, worker: str) -> Job:
    job = queue.claim(worker)
    assert job is not None
    return job


# -- signals: the worker in its own process -----------------------------------------------------------------


def start_worker_process(settings: Settings, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(WORKER_SCRIPT), settings.resolved_database_url, str(settings.data_dir),
               "--lease", str(settings.job_lease_seconds), *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE)


def checkpoint_dir(settings: Settings, job_id: int) -> Path:
    return settings.data_dir / "checkpoints" / f"job-{job_id}"


def checkpointed(settings: Settings, job_id: int, steps: int) -> Callable[[], bool]:
    def reached() -> bool:
        try:
            return read_step(checkpoint_dir(settings, job_id)) >= steps
        except ValueError:  # a write in progress
            return False

    return reached


@pytest.mark.slow
def test_sigterm_releases_the_job_and_exits_cleanly(settings: Settings, queue: JobQueue) -> None:
    job = queue.enqueue("checkpointed_steps", {"steps": 40, "step_seconds": 0.05})
    process = start_worker_process(settings)
    wait_for(checkpointed(settings, job.id, 2), 30, "the job to checkpoint")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr.decode()
    released = queue.get(job.id)
    assert (released.status, released.lease_owner, released.attempts) == (JobStatus.QUEUED, None, 0)
    assert event_types(queue, job.id)[-1] == JobEventType.RELEASED
    step = read_step(checkpoint_dir(settings, job.id))
    run_once(settings)  # the next worker resumes where the released run checkpointed
    resumed = queue.get(job.id)
    assert resumed.status == JobStatus.SUCCEEDED
    assert resumed.result == {"resumed_from": step, "steps": 40}
    assert not checkpoint_dir(settings, job.id).exists()


@pytest.mark.slow
def test_sigkill_job_is_reclaimed_after_the_lease_and_resumes(fresh_db_url: str, tmp_path: Path) -> None:
    settings = worker_settings(fresh_db_url, tmp_path / "data", lease=1.0)
    engine = make_engine(fresh_db_url)
    queue = JobQueue.from_settings(make_session_factory(engine), settings)
    job = queue.enqueue("checkpointed_steps", {"steps": 30, "step_seconds": 0.05})
    process = start_worker_process(settings)
    wait_for(checkpointed(settings, job.id, 3), 30, "the job to checkpoint")
    process.kill()
    process.communicate(timeout=30)
    step = read_step(checkpoint_dir(settings, job.id))
    survivor = Background(make_worker(settings, max_jobs=1))
    wait_for(lambda: queue.get(job.id).status == JobStatus.SUCCEEDED, 30, "another worker to finish the job")
    survivor.join()
    done = queue.get(job.id)
    assert done.result["resumed_from"] == step >= 3
    assert done.attempts == 2 and "reclaimed" in event_types(queue, job.id)
    assert not (checkpoint_dir(settings, job.id) / STEP_FILE).exists()
    engine.dispose()


# -- the command line and the embedded mode -----------------------------------------------------------------


def test_worker_command_help() -> None:
    result = CliRunner().invoke(cli_app, ["worker", "--help"])
    assert result.exit_code == 0
    for option in ("--kinds", "--once", "--max-jobs", "--poll"):
        assert option in result.output


def test_worker_refuses_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    settings = worker_settings(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path / "data")
    with pytest.raises(WorkerSetupError, match="kmserve migrate"):
        build_worker(settings)


def test_embedded_app_runs_the_worker_thread_for_its_lifetime(app_settings: Settings) -> None:
    from fastapi.testclient import TestClient

    api = embedded_app(app_settings, handlers=HandlerTable({"succeed": succeed}), config=fast_config())
    with TestClient(api):
        thread: WorkerThread = api.state.worker_thread
        assert thread.is_alive()
        queue: JobQueue = api.state.kmserve.queue
        job = queue.enqueue("succeed", {"value": "embedded"})
        wait_for(lambda: queue.get(job.id).status == JobStatus.SUCCEEDED, 20, "the embedded worker")
        assert queue.get(job.id).result == {"echo": "embedded"}
    assert not thread.is_alive()
