"""Job-queue throughput: claim+complete cycles per second with 1 and N worker processes, PostgreSQL and SQLite.

usage: python -m bench.queue [--jobs N] [--workers 1,4] [--db-url URL] ...

Each run gets a fresh database (a new schema on PostgreSQL, dropped afterwards; a temporary file for SQLite),
enqueues N jobs, starts the workers together and times them until the queue is drained. Prints one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file, this folder leads sys.path and this module would shadow the standard `queue` module
    # (psycopg and multiprocessing import it); the repository root goes there instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from registry.db import make_engine, make_session_factory, migrate
from registry.queue import JobQueue, JobSpec

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SQLITE = "sqlite"  # --db-url value meaning: a temporary SQLite file
DRAIN_TIMEOUT_S = 3600.0  # a worker that died never reports; fail rather than wait forever


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per run")
    parser.add_argument("--workers", default="1,4", help="comma-separated worker-process counts")
    parser.add_argument("--db-url", action="append", dest="db_urls",
                        help=f"PostgreSQL URL, or '{SQLITE}' (repeatable; default: {DEFAULT_POSTGRES_URL} and sqlite)")
    args = parser.parse_args(argv)
    args.db_urls = args.db_urls or [DEFAULT_POSTGRES_URL, SQLITE]
    args.workers = [int(n) for n in args.workers.split(",")]
    return args


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A migrated empty database for one run: a temporary SQLite file, or a PostgreSQL schema dropped after."""
    if url == SQLITE:
        with tempfile.TemporaryDirectory(prefix="kmbench-") as folder:
            yield _migrated(f"sqlite:///{folder}/bench.db")
        return
    schema = f"kmbench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        scoped = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield _migrated(scoped.render_as_string(hide_password=False))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def _migrated(url: str) -> str:
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


def _worker(url: str, worker_id: str, start: Any, done: Any) -> None:
    engine = make_engine(url, pool_size=1)
    queue = JobQueue(make_session_factory(engine))
    queue.stats()  # connect before the clock starts
    start.wait()
    cycles = 0
    while (job := queue.claim(worker_id)) is not None:
        queue.complete(job.id, worker_id)
        cycles += 1
    engine.dispose()
    done.put(cycles)


def run_once(url: str, jobs: int, workers: int) -> dict[str, Any]:
    """Enqueue `jobs`, drain them with `workers` processes, and report the rates."""
    engine = make_engine(url)
    queue = JobQueue(make_session_factory(engine))
    began = time.perf_counter()
    queue.enqueue_many(JobSpec("bench", {"n": n}) for n in range(jobs))
    enqueue_seconds = time.perf_counter() - began
    drain_seconds, cycles = _drain(url, workers)
    succeeded = queue.stats()["succeeded"]
    engine.dispose()
    return {
        "backend": make_url(url).get_backend_name(), "workers": workers, "jobs": jobs,
        "succeeded": succeeded, "cycles_per_worker": cycles, "seconds": round(drain_seconds, 3),
        "claims_per_s": round(jobs / drain_seconds, 1), "enqueue_many_per_s": round(jobs / enqueue_seconds, 1),
    }


def _drain(url: str, workers: int) -> tuple[float, list[int]]:
    context = mp.get_context("spawn")  # a fresh interpreter per worker, as real workers are
    start, done = context.Barrier(workers + 1), context.Queue()
    procs = [context.Process(target=_worker, args=(url, f"bench-{n}", start, done)) for n in range(workers)]
    for proc in procs:
        proc.start()
    start.wait()
    began = time.perf_counter()
    cycles = sorted((done.get(timeout=DRAIN_TIMEOUT_S) for _ in procs), reverse=True)
    elapsed = time.perf_counter() - began
    for proc in procs:
        proc.join()
    return elapsed, cycles


def bench(url: str, jobs: int, worker_counts: list[int]) -> list[dict[str, Any]]:
    """One result per worker count on the database at `url`; an error entry when it cannot be reached."""
    results = []
    for workers in worker_counts:
        try:
            with fresh_database(url) as fresh:
                results.append(run_once(fresh, jobs, workers))
        except OperationalError as exc:
            return [{"db_url": url, "error": str(exc.orig or exc).strip()}]
    return results


def main(argv: list[str] | None = None) -> None:
    """Run every database and worker count asked for and print the JSON report."""
    args = _parse(argv)
    results = [row for url in args.db_urls for row in bench(url, args.jobs, args.workers)]
    print(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
