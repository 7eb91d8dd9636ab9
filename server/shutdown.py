"""Graceful shutdown: on SIGTERM (or Ctrl+C) the server drains before it stops.

Draining: the listening socket stays open, `/readyz` and every new request answer 503 `shutting_down` (so a load
balancer takes the replica out of rotation), and requests already in flight run to their end for up to
`shutdown_drain_seconds`. Then uvicorn closes the sockets, gives stragglers a last grace second, and runs the
lifespan shutdown, which stops the trainer worker thread (`kmserve up`) and closes the generation engine.
A second signal skips the drain (uvicorn's own shutdown; a third one forces it).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.errors import RetryLaterError

log = logging.getLogger(__name__)

MSG_SHUTTING_DOWN = "this server is shutting down and takes no new requests; retry, another replica will answer."
MSG_DRAINING = "draining: %d request(s) in flight; new requests get 503 for up to %.1f s"
MSG_DRAINED = "drained: no request in flight"
MSG_DRAIN_TIMEOUT = "drain timeout: %d request(s) still in flight are cut"
# Paths that keep answering while draining: liveness (the process is fine) and metrics (to watch the drain).
ANSWERED_WHILE_DRAINING = frozenset({"/healthz", "/metrics"})
# After the drain, uvicorn's own graceful shutdown waits this long for responses still being written.
FINAL_GRACE_SECONDS = 1
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShuttingDownError(RetryLaterError):
    """A new request arrived while the server drains for shutdown."""

    code = "shutting_down"
    status = 503

    def __init__(self) -> None:
        super().__init__(MSG_SHUTTING_DOWN, retry_after=1)


class Drain:
    """Counts requests in flight and, once shutdown begins, says which new ones to refuse and when it is done."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._in_flight = 0
        self._deadline: float | None = None

    @property
    def draining(self) -> bool:
        """True once shutdown has begun."""
        return self._deadline is not None

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._in_flight

    def begin(self, seconds: float) -> None:
        """Start draining: refuse new requests, wait at most `seconds` for those in flight."""
        if self._deadline is None:
            self._deadline = self._clock() + seconds
            log.info(MSG_DRAINING, self._in_flight, seconds)

    def finished(self) -> bool:
        """True when draining and nothing is in flight any more, or the drain time is up."""
        if self._deadline is None:
            return False
        if self._in_flight == 0:
            log.info(MSG_DRAINED)
            return True
        if self._clock() >= self._deadline:
            log.warning(MSG_DRAIN_TIMEOUT, self._in_flight)
            return True
        return False

    def refuses(self, path: str) -> bool:
        """True when a new request for `path` must be refused because the server drains."""
        return self.draining and path not in ANSWERED_WHILE_DRAINING

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count one request in flight for the duration of the block."""
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1


def app_drain(app: FastAPI) -> Drain:
    """The drain state `create_app` attached to the app."""
    drain: Drain = app.state.drain
    return drain


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains the app before uvicorn's shutdown.

    The first signal is not re-raised after shutdown (uvicorn re-raises the signals it handled), so a drained
    server exits with status 0.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_seconds: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_seconds = drain_seconds

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: begin draining; any later one: uvicorn's handling (shut down now, then force)."""
        if sig in DRAIN_SIGNALS and not self._drain.draining and not self.should_exit:
            self._drain.begin(self._drain_seconds)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """Uvicorn's tick (every 0.1 s), which also ends the main loop once the drain is over."""
        if not self.should_exit and self._drain.finished():
            self.should_exit = True
        return await super().on_tick(counter)


def run_draining(app: FastAPI, *, host: str, port: int, log_level: str, drain_seconds: float) -> None:
    """Serve `app` with uvicorn until a signal, draining it first (see the module docstring)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=FINAL_GRACE_SECONDS)
    DrainingServer(config, app_drain(app), drain_seconds).run()
