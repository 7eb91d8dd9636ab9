"""The handler table: which function runs each job kind, imported on first use so a worker loads only what it runs.

A handler takes the job's `JobContext` and returns the job's result (a JSON-able dict, or None for none). It calls
`ctx.report(...)` at every step; see `trainer_worker.context` for the signals it must honour.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from trainer_worker.context import JobContext, PermanentJobError

Handler = Callable[[JobContext], dict[str, Any] | None]

DEFAULT_HANDLERS: dict[str, str] = {
    "ingest": "trainer_worker.ingest:run",
    "synthesize": "trainer_worker.synthesize:run",
    "train_km": "trainer_worker.train_km:run",
    "train_ke": "trainer_worker.train_ke:run",
    "train_reranker": "trainer_worker.train_reranker:run",
    "train_reasoner": "trainer_worker.train_reasoner:run",
    "train_compressor": "trainer_worker.train_compressor:run",
    "train_compressor_extractive": "trainer_worker.train_compressor:run_extractive",
    "train_compressor_abstractive": "trainer_worker.train_compressor:run_abstractive",
}

MSG_UNKNOWN_KIND = "no handler for job kind {kind!r} on this worker; it runs {known}."
MSG_BAD_PATH = "handler path {path!r} must look like 'package.module:function'"
MSG_IMPORT_FAILED = "the handler of job kind {kind!r} ({path}) could not be loaded: {detail}"


class UnknownJobKindError(PermanentJobError):
    """A job of a kind the worker has no handler for: no retry can fix it."""

    def __init__(self, kind: str, known: list[str]) -> None:
        super().__init__(MSG_UNKNOWN_KIND.format(kind=kind, known=", ".join(known) or "nothing"))
        self.kind = kind


class HandlerLoadError(PermanentJobError):
    """A handler's module or function is missing or broken (a deployment error, not the job's)."""


class HandlerTable:
    """Job kind -> handler, each given as a callable or as a lazily imported 'module:function' path."""

    def __init__(self, handlers: Mapping[str, str | Handler] | None = None) -> None:
        entries = dict(DEFAULT_HANDLERS if handlers is None else handlers)
        for path in entries.values():
            if isinstance(path, str) and not _is_dotted_path(path):
                raise ValueError(MSG_BAD_PATH.format(path=path))
        self._entries: dict[str, str | Handler] = entries
        self._lock = threading.Lock()

    @property
    def kinds(self) -> list[str]:
        """The job kinds this table can run, sorted."""
        return sorted(self._entries)

    def resolve(self, kind: str) -> Handler:
        """The handler of `kind`, imported on first use; UnknownJobKindError / HandlerLoadError otherwise."""
        with self._lock:
            entry = self._entries.get(kind)
            if entry is None:
                raise UnknownJobKindError(kind, self.kinds)
            if isinstance(entry, str):
                entry = self._entries[kind] = _import(kind, entry)
            return entry


def _is_dotted_path(path: str) -> bool:
    module, _, name = path.partition(":")
    return bool(module) and name.isidentifier()


def _import(kind: str, path: str) -> Handler:
    module_name, _, name = path.partition(":")
    try:
        handler = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise HandlerLoadError(MSG_IMPORT_FAILED.format(kind=kind, path=path, detail=exc)) from exc
    if not callable(handler):
        raise HandlerLoadError(MSG_IMPORT_FAILED.format(kind=kind, path=path, detail="it is not callable"))
    return handler  # type: ignore[no-any-return]
