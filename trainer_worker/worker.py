"""The trainer worker loop: claim a job, run its handler under a heartbeat, and settle the job by how it ended.

How a handler ends decides what happens to its job: a result completes it; `JobCancelled` confirms a cancel;
`JobPreempted` (after SIGTERM) hands it back to the queue at once; `PermanentJobError` fails it for good; any other
exception fails the attempt, retried with backoff while attempts remain; `LeaseLostError` means another worker owns
the job now, so this one leaves it alone.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import signal
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from sqlalchemy import Engine as SqlEngine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.errors import JobStateError, LeaseLostError, RegistryError
from registry.models import Job, JobStatus
from registry.queue import JobQueue
from registry.store import AdapterStore
from trainer_worker.context import JobCancelled, JobContext, JobPreempted, PermanentJobError
from trainer_worker.engine_runtime import EngineRuntime, PrivateEngineRuntime
from trainer_worker.handlers import HandlerTable
from trainer_worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)

ERROR_MAX_CHARS = 4000
MSG_NOT_MIGRATED = "the database at {url} is at revision {current}, not {head}; run `kmserve migrate` first."
MSG_BAD_RESULT = "the {kind} handler returned {type_name}; a handler returns a dict (its job's result) or None."


class Outcome(enum.StrEnum):
    """How one run of a job ended, from this worker's point of view."""

    SUCCEEDED = "succeeded"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RELEASED = "released"
    LEASE_LOST = "lease_lost"
    ABANDONED = "abandoned"  # the database refused the final report; the lease expires and the job is reclaimed


_FINAL = (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED)
_BY_STATUS = {JobStatus.QUEUED: Outcome.RETRY_SCHEDULED, JobStatus.FAILED: Outcome.FAILED,
              JobStatus.CANCELLED: Outcome.CANCELLED}


class WorkerSetupError(RuntimeError):
    """The worker cannot start (e.g. the database schema is out of date)."""


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker polls and when it stops; `once` exits as soon as nothing is claimable."""

    kinds: tuple[str, ...] | None = None
    poll_seconds: float = 1.0
    max_poll_seconds: float = 15.0
    once: bool = False
    max_jobs: int | None = None
    heartbeat_seconds: float | None = None  # None: a third of the lease

    def __post_init__(self) -> None:
        if self.poll_seconds <= 0 or self.max_poll_seconds < self.poll_seconds:
            raise ValueError(f"poll_seconds must be > 0 and <= max_poll_seconds, got {self.poll_seconds} "
                             f"and {self.max_poll_seconds}")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1 or None, got {self.max_jobs}")
        if self.heartbeat_seconds is not None and self.heartbeat_seconds <= 0:
            raise ValueError(f"heartbeat_seconds must be > 0 or None, got {self.heartbeat_seconds}")
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(self.kinds))


@dataclass
class WorkerStats:
    """What a worker did: how many jobs ended each way."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)

    @property
    def jobs(self) -> int:
        """Jobs run, however they ended."""
        return sum(self.outcomes.values())

    def summary(self) -> dict[str, int]:
        """Jobs per outcome, by outcome name."""
        return {outcome.value: count for outcome, count in self.outcomes.items()}


def make_worker_id() -> str:
    """hostname:pid:random, unique per worker and readable in the jobs table."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Claims jobs from the queue and runs them through a handler table, one at a time."""

    def __init__(
        self, *, queue: JobQueue, sessions: sessionmaker[Session], store: AdapterStore, settings: Settings,
        handlers: HandlerTable, runtime: EngineRuntime, config: WorkerConfig | None = None,
        worker_id: str | None = None, db_engine: SqlEngine | None = None,
    ) -> None:
        self.queue, self.sessions, self.store, self.settings = queue, sessions, store, settings
        self.handlers, self.runtime = handlers, runtime
        self.config = config or WorkerConfig()
        self.worker_id = worker_id or make_worker_id()
        self.stop_event = threading.Event()
        self.stats = WorkerStats()
        self._db_engine = db_engine

    def request_stop(self) -> None:
        """Stop after the current step: the running job is checkpointed and released, then `run` returns."""
        self.stop_event.set()

    def run(self) -> WorkerStats:
        """Claim and run jobs until stopped, idle (with `once`) or `max_jobs` ran; polls back off while idle."""
        log.info("worker %s started (kinds: %s)", self.worker_id, ", ".join(self.config.kinds or ["any"]))
        idle = self.config.poll_seconds
        while not self._should_exit():
            job = self._claim()
            if job is not None:
                idle = self.config.poll_seconds
                self.run_job(job)
            elif self.config.once:
                break
            else:
                self.stop_event.wait(idle)
                idle = min(idle * 2, self.config.max_poll_seconds)
        log.info("worker %s stopped: %s", self.worker_id, self.stats.summary())
        return self.stats

    def run_job(self, job: Job) -> Outcome:
        """Run one claimed job to its end and report that end to the queue."""
        ctx = self._context(job)
        log.info("job %s (%s) attempt %d started", job.id, job.kind, job.attempts)
        with Heartbeat(ctx, self._heartbeat_seconds()):
            result, error = self._invoke(ctx)
        outcome = self._settle(ctx, result, error)
        if outcome in _FINAL:
            shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
        self.stats.outcomes[outcome] += 1
        log.info("job %s (%s) %s", job.id, job.kind, outcome.value)
        return outcome

    def close(self) -> None:
        """Release the engine this worker built and its database connections."""
        self.runtime.close()
        if self._db_engine is not None:
            self._db_engine.dispose()

    # -- steps -----------------------------------------------------------------------------------------------

    def _should_exit(self) -> bool:
        limit = self.config.max_jobs
        return self.stop_event.is_set() or (limit is not None and self.stats.jobs >= limit)

    def _claim(self) -> Job | None:
        try:
            return self.queue.claim(self.worker_id, self.config.kinds)
        except SQLAlchemyError:
            log.warning("claiming a job failed; retrying after the poll interval", exc_info=True)
            return None

    def _heartbeat_seconds(self) -> float:
        return self.config.heartbeat_seconds or self.settings.job_lease_seconds / 3

    def _context(self, job: Job) -> JobContext:
        return JobContext(
            job=job, worker_id=self.worker_id, queue=self.queue, sessions=self.sessions, store=self.store,
            settings=self.settings, engine_provider=self.runtime.engine, stop_event=self.stop_event,
            async_runner=self.runtime.run,
        )

    def _invoke(self, ctx: JobContext) -> tuple[dict[str, Any] | None, Exception | None]:
        try:
            result = self.handlers.resolve(ctx.job.kind)(ctx)
        except Exception as exc:  # every handler failure is settled with the queue, none may kill the worker
            return None, exc
        if result is not None and not isinstance(result, dict):
            return None, PermanentJobError(MSG_BAD_RESULT.format(kind=ctx.job.kind, type_name=type(result).__name__))
        return result, None

    def _settle(self, ctx: JobContext, result: dict[str, Any] | None, error: Exception | None) -> Outcome:
        try:
            return self._report(ctx, result, error)
        except LeaseLostError:
            return Outcome.LEASE_LOST
        except SQLAlchemyError:
            log.error("could not report the end of job %s; it will be reclaimed", ctx.job.id, exc_info=True)
            return Outcome.ABANDONED

    def _report(self, ctx: JobContext, result: dict[str, Any] | None, error: Exception | None) -> Outcome:
        job_id, worker_id = ctx.job.id, self.worker_id
        if error is None:
            self.queue.complete(job_id, worker_id, result)
            return Outcome.SUCCEEDED
        if isinstance(error, LeaseLostError) or ctx.lease_lost.is_set():
            return Outcome.LEASE_LOST
        if isinstance(error, JobCancelled) and ctx.cancel_seen.is_set():
            return self._cancelled(job_id)
        if isinstance(error, JobPreempted):
            released = self.queue.release(job_id, worker_id)
            return Outcome.RELEASED if released.status == JobStatus.QUEUED else Outcome.CANCELLED
        permanent = isinstance(error, PermanentJobError)
        if not permanent:
            log.error("job %s (%s) failed", job_id, ctx.job.kind, exc_info=error)
        job = self.queue.fail(job_id, worker_id, describe_error(error), retryable=not permanent)
        return _BY_STATUS.get(job.status, Outcome.FAILED)

    def _cancelled(self, job_id: int) -> Outcome:
        try:
            self.queue.mark_cancelled(job_id, self.worker_id)
        except JobStateError:  # cannot happen while cancel_seen is set; kept so a bug never kills the loop
            self.queue.fail(job_id, self.worker_id, "cancelled without a cancel request", retryable=False)
            return Outcome.FAILED
        return Outcome.CANCELLED


def describe_error(error: BaseException) -> str:
    """The error recorded on a job: our typed errors by message, anything else with its type name."""
    if isinstance(error, PermanentJobError):
        text = str(error)
    elif isinstance(error, RegistryError):
        text = f"{type(error).__name__}: {error.message}"
    else:
        text = f"{type(error).__name__}: {error}"
    return text[:ERROR_MAX_CHARS]


def build_worker(
    settings: Settings, *, handlers: HandlerTable | None = None, config: WorkerConfig | None = None,
    runtime: EngineRuntime | None = None, worker_id: str | None = None,
) -> Worker:
    """A worker on the configured database and store; refuses a database that is not migrated to head."""
    from registry.db import current_revision, head_revision, make_engine, make_session_factory

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db_engine = make_engine(settings.resolved_database_url, pool_size=settings.db_pool_size)
    current, head = current_revision(db_engine), head_revision()
    if current != head:
        db_engine.dispose()
        url = db_engine.url.render_as_string()
        raise WorkerSetupError(MSG_NOT_MIGRATED.format(url=url, current=current, head=head))
    sessions = make_session_factory(db_engine)
    return Worker(
        queue=JobQueue.from_settings(sessions, settings), sessions=sessions, store=AdapterStore.from_settings(settings),
        settings=settings, handlers=handlers or HandlerTable(), config=config, worker_id=worker_id,
        runtime=runtime or PrivateEngineRuntime.from_settings(settings), db_engine=db_engine,
    )


class WorkerThread:
    """A worker on a background thread of this process: the embedded mode of `kmserve up`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._thread = threading.Thread(target=self._main, name="kmserve-worker", daemon=True)

    def start(self) -> None:
        """Start running jobs."""
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the worker runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the worker to stop after its current step and wait; True once it has stopped."""
        self.worker.request_stop()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _main(self) -> None:
        try:
            self.worker.run()
        except Exception:  # a dead worker thread must leave a trace; the server keeps serving
            log.exception("the embedded worker stopped on an error")
        finally:
            self.worker.close()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_signal_handlers(worker: Worker, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
    """Make SIGTERM/SIGINT stop the worker gracefully; a second SIGINT interrupts at once."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and worker.stop_event.is_set():
            raise KeyboardInterrupt
        log.info("signal %s: finishing the current step, then releasing the job", signal.Signals(signum).name)
        worker.request_stop()

    for signum in signals:
        signal.signal(signum, on_signal)
