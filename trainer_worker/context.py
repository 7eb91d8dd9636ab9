"""What a job handler gets: its job, the registry, a way to report progress, and the signals to stop.

Handlers call `ctx.report(...)` every step: it renews the lease, records progress and raises `JobCancelled` once a
cancel was requested. `ctx.check()` raises `JobPreempted` after SIGTERM so the handler can checkpoint and return the
job to the queue. A background heartbeat keeps the lease alive through long steps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from registry.errors import LeaseLostError
from registry.models import Job

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from engines.base import Engine
    from registry.config import Settings
    from registry.queue import JobQueue
    from registry.store import AdapterStore

_T = TypeVar("_T")


class AsyncRunner(Protocol):
    """Runs a coroutine to completion from synchronous code, on the event loop the worker's engine lives on."""

    def __call__(self, coro: Coroutine[Any, Any, _T], /) -> _T: ...


class JobCancelled(Exception):  # noqa: N818 - a signal, not an error
    """A cancel was requested: stop within one step, the job ends cancelled."""


class JobPreempted(Exception):  # noqa: N818 - a signal, not an error
    """The worker is shutting down (SIGTERM): checkpoint, and the job goes back to the queue."""


class PermanentJobError(Exception):
    """A failure that retrying cannot fix (bad input): the job fails at once, with this message."""


@dataclass
class JobContext:
    """One running job and everything its handler may use."""

    job: Job
    worker_id: str
    queue: JobQueue
    sessions: sessionmaker[Session]
    store: AdapterStore
    settings: Settings
    engine_provider: Callable[[], Engine]
    stop_event: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    cancel_seen: threading.Event = field(default_factory=threading.Event)
    async_runner: AsyncRunner | None = None

    @property
    def payload(self) -> dict[str, Any]:
        """The job's payload."""
        return self.job.payload

    @property
    def checkpoint_dir(self) -> Path:
        """Where this job keeps its resumable state (survives the worker; removed when the job ends)."""
        return self.settings.data_dir / "checkpoints" / f"job-{self.job.id}"

    def report(self, progress: float, message: str | None = None, metrics: dict[str, Any] | None = None) -> None:
        """Record progress (0..1), renew the lease; raise JobCancelled / JobPreempted when the job must stop."""
        try:
            beat = self.queue.progress(self.job.id, self.worker_id, progress, message, metrics)
        except LeaseLostError:
            self.lease_lost.set()
            raise
        if beat.cancel_requested:
            self.cancel_seen.set()
        self.check()

    def check(self) -> None:
        """Raise at a step boundary when the job should stop (cancelled, lease lost, or worker shutting down)."""
        if self.lease_lost.is_set():
            raise LeaseLostError(self.job.id, self.worker_id)
        if self.cancel_seen.is_set():
            raise JobCancelled()
        if self.stop_event.is_set():
            raise JobPreempted()

    def engine(self) -> Engine:
        """The generation engine of this worker (loaded once, shared by jobs)."""
        return self.engine_provider()

    def run_async(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine such as `engine.generate(...)` on the worker's event loop (a fresh one when it has none)."""
        if self.async_runner is None:
            return asyncio.run(coro)
        return self.async_runner(coro)
