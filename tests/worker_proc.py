"""Small real job handlers for the worker tests, and a worker process that runs them (for signal tests).

usage: worker_proc.py DATABASE_URL DATA_DIR [--lease SECONDS] [--max-jobs N]

The process runs `kmserve worker`'s code path (build_worker + install_signal_handlers + run) with TEST_HANDLERS as
its handler table, and exits 0 once the worker stops (after SIGTERM it releases its job first).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from registry.config import Settings
from trainer_worker.context import JobContext, PermanentJobError
from trainer_worker.handlers import Handler, HandlerTable
from trainer_worker.worker import WorkerConfig, build_worker, install_signal_handlers

STEP_FILE = "step"
REJECTED = "the input is unusable"


def succeed(ctx: JobContext) -> dict[str, Any]:
    """Report once and return the payload's value."""
    ctx.report(0.5, "half way", metrics={"loss": [1.0, 0.5]})
    return {"echo": ctx.payload.get("value")}


def always_fail(ctx: JobContext) -> dict[str, Any]:
    """Fail the way a bug does."""
    raise RuntimeError(ctx.payload.get("message", "boom"))


def reject(ctx: JobContext) -> dict[str, Any]:
    """Fail the way bad input does."""
    raise PermanentJobError(REJECTED)


def report_steps(ctx: JobContext) -> dict[str, Any]:
    """Report every step and append the step to the payload's trace file after the report went through."""
    trace = Path(ctx.payload["trace"])
    steps = int(ctx.payload.get("steps", 100_000))
    for step in range(steps):
        ctx.report(step / steps, f"step {step}")
        with trace.open("a") as file:
            file.write(f"{step}\n")
        time.sleep(float(ctx.payload.get("step_seconds", 0.02)))
    return {"steps": steps}


def check_steps(ctx: JobContext) -> dict[str, Any]:
    """Steps that only check for stop signals (no reports): only the heartbeat renews the lease."""
    steps = int(ctx.payload.get("steps", 100_000))
    for _ in range(steps):
        ctx.check()
        time.sleep(float(ctx.payload.get("step_seconds", 0.02)))
    return {"steps": steps}


def checkpointed_steps(ctx: JobContext) -> dict[str, Any]:
    """Steps that checkpoint their count before each report, and resume from the checkpoint when run again."""
    steps = int(ctx.payload["steps"])
    start = read_step(ctx.checkpoint_dir)
    for step in range(start, steps):
        time.sleep(float(ctx.payload.get("step_seconds", 0.05)))
        write_step(ctx.checkpoint_dir, step + 1)
        ctx.report((step + 1) / steps, f"step {step + 1}")
    return {"resumed_from": start, "steps": steps}


def read_step(directory: Path) -> int:
    """The step count checkpointed in `directory` (0 without a checkpoint)."""
    path = directory / STEP_FILE
    return int(path.read_text()) if path.is_file() else 0


def write_step(directory: Path, step: int) -> None:
    """Checkpoint a step count atomically (a reader never sees a half-written file)."""
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{STEP_FILE}.tmp"
    temporary.write_text(str(step))
    os.replace(temporary, directory / STEP_FILE)


TEST_HANDLERS: dict[str, str | Handler] = {
    "succeed": succeed, "always_fail": always_fail, "reject": reject, "report_steps": report_steps,
    "check_steps": check_steps, "checkpointed_steps": checkpointed_steps,
}


def worker_settings(database_url: str, data_dir: Path, lease: float = 60.0, **overrides: Any) -> Settings:
    """Settings of a worker test: its own data dir and database, fast retries."""
    return Settings(data_dir=data_dir, database_url=database_url, job_lease_seconds=lease,
                    job_retry_backoff_seconds=0.05, **overrides)


def fast_config(**overrides: Any) -> WorkerConfig:
    """A worker config that polls often, for tests."""
    return WorkerConfig(**{"poll_seconds": 0.02, "max_poll_seconds": 0.1, **overrides})


def main(argv: list[str] | None = None) -> None:
    """Run a worker over TEST_HANDLERS until it is stopped."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database_url")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--max-jobs", type=int, default=None)
    args = parser.parse_args(argv)
    settings = worker_settings(args.database_url, args.data_dir, args.lease)
    worker = build_worker(settings, handlers=HandlerTable(TEST_HANDLERS), config=fast_config(max_jobs=args.max_jobs))
    install_signal_handlers(worker)
    try:
        worker.run()
    finally:
        worker.close()


if __name__ == "__main__":
    main()
