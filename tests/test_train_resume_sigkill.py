"""A real `kmserve worker` process killed with SIGKILL mid-training: the job is reclaimed after its lease expires and
the next worker resumes from the checkpoint (it does not start over); one KM version comes out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from registry.adapters import get_adapter
from registry.config import Settings
from registry.db import make_engine, make_session_factory, migrate, write_transaction
from registry.documents import DocumentCreate, content_hash, create_document
from registry.models import JobStatus
from registry.queue import JobQueue, JobSpec
from registry.store import AdapterStore

TEXT = " ".join(f"Fact {i}: the river {chr(65 + i % 26)}ova flows past the town of Kel{i} for {i * 3} miles."
                for i in range(60))
STEPS, CHECKPOINT_EVERY = 120, 5
pytestmark = pytest.mark.slow


def _worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "clients.cli", "worker", "--poll", "0.2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_sigkill_mid_training_resumes_from_the_checkpoint(app_settings: Settings) -> None:
    settings = app_settings.model_copy(update={"job_lease_seconds": 3.0})
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    queue, store = JobQueue.from_settings(sessions, settings), AdapterStore.from_settings(settings)
    blob = store.put_blob(TEXT.encode(), ".txt")
    train = {"method": "ddcd", "steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "eval_every": 50,
             "patience": 100}
    payload = {"blob_uri": blob.uri, "media_type": "text/plain", "train": train}
    with write_transaction(sessions) as session:
        document, _ = create_document(session, DocumentCreate("rivers", content_hash(TEXT), len(TEXT),
                                                              text_uri=blob.uri))
        _, train_job = queue.add_chain(session, [JobSpec("ingest", payload, document_id=document.id),
                                                 JobSpec("train_km", payload, document_id=document.id)])
    env = {**os.environ, "KMSERVE_DATA_DIR": str(settings.data_dir), "KMSERVE_BASE_MODEL": str(settings.base_model),
           "KMSERVE_MODEL_NAME": "kmserve-tiny", "KMSERVE_JOB_LEASE_SECONDS": "3"}
    checkpoints = settings.data_dir / "checkpoints" / f"job-{train_job.id}"

    first = _worker(env)
    try:
        _wait(lambda: (checkpoints / "LATEST").exists() and queue.get(train_job.id).metrics.get("step", 0)
              >= 2 * CHECKPOINT_EVERY, 240, "the first worker to checkpoint")
        step_at_kill = queue.get(train_job.id).metrics["step"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert queue.get(train_job.id).status == JobStatus.RUNNING  # held by a dead worker until its lease expires

    second = _worker(env)
    try:
        _wait(lambda: queue.get(train_job.id).status.is_final, 600, "the second worker to finish the job")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    job = queue.get(train_job.id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    with sessions() as session:
        adapter = get_adapter(session, job.result["adapter_id"])
        resumed = adapter.metrics["resumed_from_step"]
    assert resumed is not None and CHECKPOINT_EVERY <= resumed <= step_at_kill
    assert resumed % CHECKPOINT_EVERY == 0
    assert "reclaimed" in [event.type for event in queue.events_since(train_job.id)]
    assert not checkpoints.exists()
    assert job.result["version"] == 1
    engine.dispose()
