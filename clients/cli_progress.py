"""Live progress of jobs for the CLI: a rich progress bar per job (kind, step, loss, ETA), fed by the job's
server-sent events, falling back to polling when the stream breaks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn

from clients.sdk import ConnectionError, Job, KmClient, TimeoutError

POLL_SECONDS = 1.0


def describe(metrics: Mapping[str, Any]) -> str:
    """`step 3/10  loss 2.310` from a job's metrics (what is known of it)."""
    parts = []
    if "step" in metrics:
        steps = metrics.get("steps")
        parts.append(f"step {metrics['step']}/{steps}" if steps else f"step {metrics['step']}")
    loss = metrics.get("loss")
    if isinstance(loss, list) and loss:
        loss = loss[-1]
    if isinstance(loss, int | float):
        parts.append(f"loss {loss:.3f}")
    return "  ".join(parts)


class JobProgress:
    """One progress bar per job, updated from its events until it ends."""

    def __init__(self, km: KmClient, console: Console) -> None:
        self._km = km
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeRemainingColumn(), console=console)
        self._metrics: dict[str, Any] = {}

    def watch(self, job_ids: Iterable[int]) -> Job | None:
        """Follow the jobs in order; the first that did not succeed, or None when all did."""
        with self._progress:
            for job_id in job_ids:
                final = self._follow(job_id)
                if final.status != "succeeded":
                    return final
        return None

    def _follow(self, job_id: int) -> Job:
        job = self._km.jobs.get(job_id)
        self._metrics = dict(job.metrics)
        task = self._progress.add_task(f"job {job.id} {job.kind}", total=1.0, detail=describe(self._metrics))
        self._update(task, job.progress, job.message)
        try:
            final = job if job.is_final else self._from_events(job_id, task)
        except (ConnectionError, TimeoutError):
            final = self._km.jobs.wait(job_id, poll=POLL_SECONDS)
        self._update(task, final.progress, final.status, final.metrics)
        return final

    def _from_events(self, job_id: int, task: TaskID) -> Job:
        for item in self._km.jobs.events(job_id):
            if isinstance(item, Job):
                return item
            data = item.data
            self._update(task, data.get("progress"), data.get("message"), data.get("metrics"))
        return self._km.jobs.get(job_id)

    def _update(self, task: TaskID, progress: Any, message: Any, metrics: Any = None) -> None:
        if isinstance(metrics, dict):
            self._metrics.update(metrics)
        detail = describe(self._metrics) or escape(str(message or ""))
        completed = float(progress) if isinstance(progress, int | float) else None
        self._progress.update(task, completed=completed, detail=detail)
