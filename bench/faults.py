"""Fault drills on real processes: workers SIGKILLed mid-training, a server SIGKILLed mid-upload, PostgreSQL
dropping every connection (and restarting) under load.

usage: python -m bench.faults [--kills 20] [--drills worker,upload,postgres] [--restart-postgres] ...

worker:   `kmserve worker` processes train KMs of a few documents (ingest -> train_km); each is SIGKILLed at a
          random step of the training run it holds (the last step included: it is then publishing), and a fresh
          worker takes over, --kills times. Then every job must have succeeded, each document must hold exactly
          one KM version, and after `kmserve gc --grace 0` no file in the store may be unreferenced.
upload:   a `kmserve serve` process is SIGKILLed while a large multipart upload streams in slowly: no document row,
          blob or job may appear, and the restarted server must accept an upload.
postgres: clients keep a server on PostgreSQL busy while every backend of its connections is terminated
          (pg_terminate_backend) every few seconds and, with --restart-postgres, PostgreSQL restarts once. Every
          answer must be a 200 or a JSON 503, none may hang past its timeout, and the server must recover alone.
Prints JSON and writes it to bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine, median, write_json
from bench.processes import kmserve_env, sigkill, spawn_kmserve, stop, wait_for

DRILLS = ("worker", "upload", "postgres")
TEXT = " ".join(f"Fact {{n}}.{i}: the river {chr(65 + i % 26)}ova flows past the town of Kel{i} for {i * 3} miles."
                for i in range(40))
CLAIM_TIMEOUT_S = 300.0
FINISH_TIMEOUT_S = 900.0
PG_RESTART = "pg_ctlcluster --skip-systemctl-redirect {version} main restart"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drills", default=",".join(DRILLS), help=f"comma-separated, of: {', '.join(DRILLS)}")
    parser.add_argument("--kills", type=int, default=20, help="worker SIGKILLs in the worker drill")
    parser.add_argument("--documents", type=int, default=4, help="documents trained in the worker drill")
    parser.add_argument("--steps", type=int, default=80, help="training steps per KM in the worker drill")
    parser.add_argument("--uploads", type=int, default=3, help="server SIGKILLs mid-upload in the upload drill")
    parser.add_argument("--pg-seconds", type=float, default=60.0, help="length of the postgres drill")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--restart-postgres", action="store_true", help="also restart PostgreSQL once (disruptive)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


# -- the worker drill ----------------------------------------------------------------------------------------


@dataclass
class Kill:
    """Where one SIGKILL landed: the job the worker held, its kind, the step aimed at and the step it reached."""

    job_id: int | None
    kind: str | None
    target_step: int
    step: int | None
    claimed_after_s: float


@dataclass
class WorkerDrill:
    """A data dir, its registry and store, the documents queued for training and the job ids of their chains."""

    data_dir: Path
    env: dict[str, str]
    steps: int
    max_attempts: int
    documents: list[int] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)

    def __post_init__(self) -> None:
        from registry.config import Settings
        from registry.db import make_engine, make_session_factory, migrate
        from registry.queue import JobQueue
        from registry.store import AdapterStore

        # Jobs take their attempt budget from the queue that enqueues them: this one, not the workers'.
        self.settings = Settings(data_dir=self.data_dir, job_max_attempts=self.max_attempts)
        self.db = make_engine(self.settings.resolved_database_url)
        migrate(self.db)
        self.sessions = make_session_factory(self.db)
        self.queue = JobQueue.from_settings(self.sessions, self.settings)
        self.store = AdapterStore.from_settings(self.settings)

    def add_document(self) -> int:
        """A new document with its ingest -> train_km chain queued, as an upload with method ddcd queues it."""
        from registry.db import write_transaction
        from registry.documents import DocumentCreate, content_hash, create_document
        from registry.queue import JobSpec

        text = TEXT.format(n=len(self.documents))
        blob = self.store.put_blob(text.encode(), ".txt")
        # Many cheap steps (short windows, small batches): kills land at many different points of a run.
        train = {"method": "ddcd", "steps": self.steps, "checkpoint_every": 5, "eval_every": 1000, "patience": 1000,
                 "batch_size": 1, "grad_accum": 1, "window": 32, "max_dev_examples": 2}
        payload = {"blob_uri": blob.uri, "media_type": "text/plain", "train": train}
        with write_transaction(self.sessions) as session:
            document, _ = create_document(session, DocumentCreate(f"drill {len(self.documents)}",
                                                                  content_hash(text), len(text), text_uri=blob.uri))
            chain = self.queue.add_chain(session, [JobSpec(kind, dict(payload), document_id=document.id)
                                                   for kind in ("ingest", "train_km")])
        self.documents.append(document.id)
        self.jobs += [job.id for job in chain]
        return document.id

    def live(self) -> bool:
        """True while a job of the drill is queued or running."""
        return any(not self.queue.get(job_id).status.is_final for job_id in self.jobs)

    def held_by(self, pid: int) -> tuple[int, str, int | None] | None:
        """(job id, kind, step) of the running job worker `pid` holds, if any."""
        for job_id in self.jobs:
            job = self.queue.get(job_id)
            if job.status.value == "running" and _owner_pid(job.lease_owner) == pid:
                return job.id, job.kind, job.metrics.get("step")
        return None

    def kill_once(self, rng: random.Random) -> Kill | None:
        """Start a worker; once it trains, SIGKILL it at a random step of its run (the last: while it publishes).

        None when the worker ran out of work before it was seen training (a short resumed run can end between
        two looks); it is stopped and nothing is counted.
        """
        began = time.monotonic()
        worker = spawn_kmserve(["worker", "--poll", "0.2"], self.env)
        try:
            wait_for(lambda: _training(self.held_by(worker.pid)) or worker.poll() is not None or not self.live(),
                     CLAIM_TIMEOUT_S, "a worker to claim a training job")
            if not _training(self.held_by(worker.pid)):
                return None
            claimed = time.monotonic() - began
            at_claim = self.held_by(worker.pid)
            # The metrics still show the previous attempt's step until this worker reports its first one.
            wait_for(lambda: self.held_by(worker.pid) != at_claim or worker.poll() is not None, CLAIM_TIMEOUT_S,
                     "the worker's first step")
            first = self.held_by(worker.pid)
            target = rng.randint(min(int(first[2] or 0) + 1, self.steps), self.steps) if first else self.steps
            wait_for(lambda: self._reached(worker.pid, target) or worker.poll() is not None, CLAIM_TIMEOUT_S,
                     f"the worker to reach step {target}", 0.05)
            held = self.held_by(worker.pid)
        finally:
            sigkill(worker)
        return Kill(held[0] if held else None, held[1] if held else None, target, held[2] if held else None,
                    round(claimed, 2))

    def _reached(self, pid: int, step: int) -> bool:
        held = self.held_by(pid)
        return held is None or held[1] != "train_km" or int(held[2] or 0) >= step

    def finish(self) -> float:
        """Run one worker until every job of the drill ended; the seconds it took."""
        began = time.monotonic()
        worker = spawn_kmserve(["worker", "--poll", "0.2"], self.env)
        try:
            wait_for(lambda: not self.live(), FINISH_TIMEOUT_S, "the last worker to finish every job", 0.5)
        finally:
            stop(worker)
        return time.monotonic() - began


def _owner_pid(lease_owner: str | None) -> int | None:
    # Worker ids are hostname:pid:random.
    parts = (lease_owner or "").rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _training(held: tuple[int, str, int | None] | None) -> bool:
    return held is not None and held[1] == "train_km"


def run_worker_drill(root: Path, model_dir: Path, *, kills: int, documents: int, steps: int, seed: int = 0
                     ) -> dict[str, Any]:
    """SIGKILL `kills` workers at random steps of training, finish the jobs, check the outcome; the report."""
    data_dir = root / "worker-drill"
    # Every kill costs the job it hit an attempt; the budget covers them all (the default of 3 would fail a job
    # killed three times, by design).
    env = kmserve_env(data_dir, base_model=model_dir, job_lease_seconds=3, job_retry_backoff_seconds=0.2,
                      log_level="warning")
    drill = WorkerDrill(data_dir, env, steps, max_attempts=kills + 2)
    for _ in range(documents):
        drill.add_document()
    rng = random.Random(seed)
    began = time.monotonic()
    missed = 0
    while len(drill.kills) < kills:
        if not drill.live():
            drill.add_document()  # more kills asked for than the queued training could absorb
        kill = drill.kill_once(rng)
        if kill is None:
            missed += 1
        else:
            drill.kills.append(kill)
    finish_s = drill.finish()
    report = check_worker_outcome(drill)
    report.update(kills=[k.__dict__ for k in drill.kills], workers_without_a_kill=missed, finish_s=round(finish_s, 1),
                  total_s=round(time.monotonic() - began, 1),
                  median_claimed_after_s=median([k.claimed_after_s for k in drill.kills]))
    drill.db.dispose()
    return report


def check_worker_outcome(drill: WorkerDrill) -> dict[str, Any]:
    """Jobs, KM versions, aliases and checkpoints after the drill; then `kmserve gc --grace 0` and the store."""
    from sqlalchemy import select

    from registry.adapters import km_lineage
    from registry.aliases import get_alias
    from registry.models import Adapter

    problems: list[str] = []
    jobs = [drill.queue.get(job_id) for job_id in drill.jobs]
    problems += [f"job {j.id} ({j.kind}) ended {j.status.value}: {j.error}" for j in jobs if j.status.value
                 != "succeeded"]
    resumed = []
    with drill.sessions() as session:
        for document_id in drill.documents:
            rows = session.scalars(select(Adapter).where(Adapter.lineage == km_lineage(document_id))).all()
            if [row.version for row in rows] != [1]:
                problems.append(f"document {document_id} has KM versions {[row.version for row in rows]}, not [1]")
                continue
            if get_alias(session, km_lineage(document_id)).adapter_id != rows[0].id:
                problems.append(f"alias km:{document_id} does not point at its KM")
            resumed.append(rows[0].metrics.get("resumed_from_step"))
    checkpoints = [p.name for p in (drill.data_dir / "checkpoints").glob("job-*")]
    problems += [f"checkpoint {name} left behind" for name in checkpoints]
    gc_output = _run_gc(drill.env)
    problems += [f"unreferenced after gc: {path}" for path in unreferenced_files(drill)]
    return {"problems": problems, "jobs": len(jobs), "documents": len(drill.documents),
            "attempts": sorted(j.attempts for j in jobs if j.kind == "train_km"),
            "resumed_from_step": resumed, "gc": gc_output}


def _run_gc(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "clients.cli", "gc", "--grace", "0"], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    return re.sub(r"\s+", " ", done.stdout).strip()


def unreferenced_files(drill: WorkerDrill) -> list[str]:
    """Blobs and adapter directories in the store that no registry row names, and leftovers of writes."""
    from registry.adapters import referenced_digests, referenced_uris

    with drill.sessions() as session:
        names = {ref.rstrip("/").rsplit("/", 1)[-1] for ref in referenced_uris(session) | referenced_digests(session)}
    store = Path(drill.settings.resolved_store_url)
    found = [p for p in (store / "blobs").glob("*/*") if p.name not in names and p.name[:64] not in names]
    found += [p for p in (store / "adapters").glob("*") if p.name not in names and p.name[:64] not in names]
    found += list((store / "tmp").glob("*"))
    return sorted(str(p.relative_to(store)) for p in found)


# -- the driver ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the drills asked for and print the JSON report."""
    from bench.faults_server import run_postgres_drill, run_upload_drill
    from engines.tiny_model import ensure_default_model

    args = parse_args(argv)
    drills = [name.strip() for name in args.drills.split(",") if name.strip()]
    result: dict[str, Any] = {"benchmark": "faults", "settings": vars(args) | {"out": str(args.out)},
                              "machine": machine(), "load_average": {"before": os.getloadavg()}}
    out = args.out or RESULTS_DIR / "faults.json"
    with tempfile.TemporaryDirectory(prefix="kmserve-faults-") as tmp:
        root = Path(tmp)
        model_dir = ensure_default_model(root)
        if "worker" in drills:
            result["worker"] = run_worker_drill(root, model_dir, kills=args.kills, documents=args.documents,
                                                steps=args.steps, seed=args.seed)
            write_json(out, result)  # each drill's result is kept even if a later one fails
        if "upload" in drills:
            result["upload"] = [run_upload_drill(root / f"upload-{n}", model_dir, seed=args.seed + n)
                                for n in range(args.uploads)]
            write_json(out, result)
        if "postgres" in drills:
            restart = PG_RESTART.format(version=_pg_version()) if args.restart_postgres else None
            result["postgres"] = run_postgres_drill(root / "postgres", model_dir, args.pg_url,
                                                    seconds=args.pg_seconds, restart_command=restart)
    result["load_average"]["after"] = os.getloadavg()
    write_json(out, result)
    print(json.dumps(result, indent=2, default=str))
    return result


def _pg_version() -> str:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    if len(versions) != 1:
        raise SystemExit(f"expected one PostgreSQL version under /etc/postgresql, found {versions}")
    return versions[0]


if __name__ == "__main__":
    main()
