"""A job-queue worker in its own OS process, driven by the multi-process tests in test_queue.py.

usage: queue_worker_proc.py URL OUT WORKER_ID [--lease SECONDS] [--hold] [--go FILE]

Default (drain): claim and complete jobs until none is claimable, then write the claimed ids to OUT, one per line.
--hold: claim one job, write its id to OUT, then sleep until killed.
--go FILE: after connecting, create OUT.ready and wait for FILE to exist, so that all workers start together.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from registry.db import make_engine, make_session_factory
from registry.queue import JobQueue

POLL_SECONDS = 0.01


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("worker_id")
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--go", type=Path)
    return parser.parse_args(argv)


def _wait_for_go(out: Path, go: Path) -> None:
    out.with_name(out.name + ".ready").touch()
    while not go.exists():
        time.sleep(POLL_SECONDS)


def _drain(queue: JobQueue, worker_id: str, out: Path) -> None:
    claimed: list[int] = []
    while (job := queue.claim(worker_id)) is not None:
        claimed.append(job.id)
        queue.complete(job.id, worker_id, {"worker": worker_id})
    out.write_text("".join(f"{job_id}\n" for job_id in claimed))


def _hold(queue: JobQueue, worker_id: str, out: Path) -> None:
    job = queue.claim(worker_id)
    out.write_text(f"{job.id}\n" if job else "")
    while True:
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    """Run one worker as the arguments say."""
    args = _parse(argv)
    engine = make_engine(args.url, pool_size=1)
    queue = JobQueue(make_session_factory(engine), lease_seconds=args.lease)
    queue.stats()  # connect before the start signal so that start-up cost is not part of the race
    if args.go is not None:
        _wait_for_go(args.out, args.go)
    if args.hold:
        _hold(queue, args.worker_id, args.out)
    _drain(queue, args.worker_id, args.out)
    engine.dispose()


if __name__ == "__main__":
    main()
