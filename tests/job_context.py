"""A real JobContext for handler tests that can act between training steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer_worker.context import JobContext


@dataclass
class HookedContext(JobContext):
    """A real JobContext that calls `hook(ctx, step)` before each report, i.e. between training steps."""

    hook: Callable[[JobContext, int], None] | None = None
    steps_reported: list[int] = field(default_factory=list)

    def report(self, progress: float, message: str | None = None, metrics: dict[str, Any] | None = None) -> None:
        step = int((metrics or {}).get("step", 0))
        self.steps_reported.append(step)
        if self.hook is not None:
            self.hook(self, step)
        super().report(progress, message, metrics)
