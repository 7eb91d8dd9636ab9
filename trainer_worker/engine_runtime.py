"""Where a worker's generation engine comes from, and the event loop its coroutines run on.

A standalone worker owns its engine: built on first use (a worker that only trains never loads it) and driven by
one private event loop, because an engine keeps loop-bound state between calls. The worker that `kmserve up` runs
next to the server borrows the server's engine and loop instead, so one process holds one copy of the model.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from engines.base import Engine
    from registry.config import Settings

_T = TypeVar("_T")


class EngineRuntime(abc.ABC):
    """An engine for job handlers and a way to run its coroutines from the worker thread."""

    @abc.abstractmethod
    def engine(self) -> Engine:
        """The generation engine (built on first call where the runtime owns it)."""

    @abc.abstractmethod
    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine to completion on the engine's event loop and return its result."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the runtime owns (nothing unless it built the engine)."""


class PrivateEngineRuntime(EngineRuntime):
    """An engine the worker builds on first use, driven by an event loop private to the worker thread."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._runner = asyncio.Runner()

    @classmethod
    def from_settings(cls, settings: Settings) -> PrivateEngineRuntime:
        """The engine KMSERVE_ENGINE selects, over the configured base model."""

        def build() -> Engine:
            from engines.factory import create_engine

            return create_engine(settings)

        return cls(build)

    def engine(self) -> Engine:
        """The engine, built by the factory on the first call."""
        with self._lock:
            if self._engine is None:
                self._engine = self._factory()
            return self._engine

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the private loop (the same loop on every call)."""
        return self._runner.run(coro)

    @property
    def started(self) -> bool:
        """True once the engine was built."""
        return self._engine is not None

    def close(self) -> None:
        """Close the engine, if it was built, then the loop."""
        if self._engine is not None:
            self._runner.run(self._engine.close())
            self._engine = None
        self._runner.close()


class BorrowedEngineRuntime(EngineRuntime):
    """An engine another component owns (the server, in `kmserve up`), used on that component's running loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, get_engine: Callable[[], Engine]) -> None:
        self._loop = loop
        self._get_engine = get_engine

    def engine(self) -> Engine:
        """The owner's engine."""
        return self._get_engine()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Submit the coroutine to the owner's loop and wait for it from this thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Nothing to release: the owner closes its engine and loop."""
