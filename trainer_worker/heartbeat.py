"""Keeping a job's lease alive while its handler runs a long step, and noticing cancels and lost leases meanwhile."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from sqlalchemy.exc import SQLAlchemyError

from registry.errors import LeaseLostError
from trainer_worker.context import JobContext

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews the lease of `ctx.job` every `interval` seconds on a background thread, as a context manager."""

    def __init__(self, ctx: JobContext, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval}")
        self._ctx = ctx
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-job-{ctx.job.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()

    def beat(self) -> bool:
        """Renew the lease once; False when the lease is gone (the handler must stop, so beating ends)."""
        ctx = self._ctx
        try:
            renewed = ctx.queue.heartbeat(ctx.job.id, ctx.worker_id)
        except LeaseLostError:
            ctx.lease_lost.set()
            return False
        except SQLAlchemyError:
            # A database hiccup: the next beat may still get through before the lease runs out.
            log.warning("heartbeat of job %s failed; retrying in %.1fs", ctx.job.id, self._interval, exc_info=True)
            return True
        if renewed.cancel_requested:
            ctx.cancel_seen.set()
        return True

    def _loop(self) -> None:
        while not self._done.wait(self._interval):
            if not self.beat():
                return
