"""Claims racing on the job queue: SQLite's BEGIN IMMEDIATE, PostgreSQL's SKIP LOCKED, several OS processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from registry.db import make_engine, make_session_factory
from registry.models import Job, JobStatus
from registry.queue import JobQueue, JobSpec
from tests.queue_helpers import event_types

WORKER_SCRIPT = Path(__file__).with_name("queue_worker_proc.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)


# -- claimers in one process -------------------------------------------------------------------------------


def statements_of(engine: Engine, action: Callable[[], object]) -> list[str]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


@pytest.mark.parametrize("fresh_db_url", ["sqlite"], indirect=True)
def test_sqlite_writes_begin_immediate_and_reads_deferred(fresh_db_url: str) -> None:
    engine = make_engine(fresh_db_url)
    queue = JobQueue(make_session_factory(engine))
    job = queue.enqueue("ingest")
    assert statements_of(engine, lambda: queue.claim("w1"))[0] == "BEGIN IMMEDIATE"
    assert statements_of(engine, lambda: queue.get(job.id))[0] == "BEGIN DEFERRED"
    engine.dispose()


@pytest.fixture
def queue_and_engine(fresh_db_url: str) -> Iterator[tuple[JobQueue, Engine]]:
    engine = make_engine(fresh_db_url)
    yield JobQueue(make_session_factory(engine)), engine
    engine.dispose()


@pytest.mark.parametrize("fresh_db_url", ["sqlite", POSTGRES], indirect=True)
def test_two_concurrent_claimers_never_get_the_same_job(queue_and_engine: tuple[JobQueue, Engine]) -> None:
    queue, engine = queue_and_engine
    first, second = queue.enqueue("ingest"), queue.enqueue("ingest")
    selected, release = threading.Event(), threading.Event()
    results: dict[str, Job | None] = {}

    def pause_after_select(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Hold claimer A inside its transaction, right after it selected (and on PostgreSQL locked) a queued job.
        if threading.current_thread().name == "A" and "run_after <=" in statement:
            selected.set()
            release.wait(10)

    def run(name: str) -> None:
        results[name] = queue.claim(name)

    event.listen(engine, "after_cursor_execute", pause_after_select)
    threads = {name: threading.Thread(target=run, args=(name,), name=name) for name in "AB"}
    threads["A"].start()
    assert selected.wait(10)
    threads["B"].start()
    threads["B"].join(1.0)
    # PostgreSQL: B skips A's locked row and is done; SQLite: B waits for A's write lock.
    assert threads["B"].is_alive() == (engine.dialect.name == "sqlite")
    release.set()
    for thread in threads.values():
        thread.join(10)
    event.remove(engine, "after_cursor_execute", pause_after_select)
    assert {name: job.id for name, job in results.items() if job} == {"A": first.id, "B": second.id}


# -- several OS processes ------------------------------------------------------------------------------------


def start_worker(url: str, out: Path, worker_id: str, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(WORKER_SCRIPT), url, str(out), worker_id, *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def drain_with_processes(url: str, jobs: int, workers: int, tmp_path: Path) -> list[list[int]]:
    engine = make_engine(url)
    JobQueue(make_session_factory(engine)).enqueue_many([JobSpec("ingest", {"n": n}) for n in range(jobs)])
    go, outs = tmp_path / "go", [tmp_path / f"claimed-{n}.txt" for n in range(workers)]
    procs = [start_worker(url, out, f"proc-{n}", "--go", str(go)) for n, out in enumerate(outs)]
    wait_for(lambda: all(o.with_name(o.name + ".ready").exists() for o in outs), 30, "workers to connect")
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
    engine.dispose()
    return [[int(line) for line in out.read_text().split()] for out in outs]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fresh_db_url", "jobs"),
    [pytest.param("postgres", 4000, marks=pytest.mark.postgres), ("sqlite", 400)],
    indirect=["fresh_db_url"],
)
def test_four_processes_run_every_job_exactly_once(fresh_db_url: str, jobs: int, tmp_path: Path) -> None:
    claimed = drain_with_processes(fresh_db_url, jobs, 4, tmp_path)
    counts = Counter(job_id for ids in claimed for job_id in ids)
    assert counts and max(counts.values()) == 1, "a job was claimed twice"
    engine = make_engine(fresh_db_url)
    queue = JobQueue(make_session_factory(engine))
    assert queue.stats()["succeeded"] == jobs == len(counts)
    if fresh_db_url.startswith("postgresql"):
        # SQLite's busy handler is not fair: a process in a tight claim loop may starve the others.
        assert sum(1 for ids in claimed if ids) >= 2, "the processes did not share the work"
    engine.dispose()


def lease_expired(queue: JobQueue, job_id: int) -> bool:
    expires = queue.get(job_id).lease_expires_at
    return expires is not None and expires < datetime.now(UTC)


@pytest.mark.slow
@pytest.mark.parametrize("fresh_db_url", ["sqlite", POSTGRES], indirect=True)
def test_a_killed_workers_job_is_reclaimed_after_its_lease(fresh_db_url: str, tmp_path: Path) -> None:
    engine = make_engine(fresh_db_url)
    queue = JobQueue(make_session_factory(engine), lease_seconds=1.0)
    job = queue.enqueue("train_km")
    out = tmp_path / "held.txt"
    proc = start_worker(fresh_db_url, out, "doomed", "--hold", "--lease", "1.0")
    wait_for(lambda: out.exists() and out.read_text().endswith("\n"), 30, "the worker to claim")
    assert int(out.read_text()) == job.id
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert queue.get(job.id).lease_owner == "doomed"
    wait_for(lambda: lease_expired(queue, job.id), 5, "the lease to expire")
    reclaimed = queue.claim("rescuer")
    assert reclaimed is not None
    assert (reclaimed.id, reclaimed.attempts) == (job.id, 2)
    assert queue.complete(job.id, "rescuer").status == JobStatus.SUCCEEDED
    assert event_types(queue, job.id) == ["queued", "claimed", "reclaimed", "claimed", "succeeded"]
    engine.dispose()
