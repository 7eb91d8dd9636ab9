"""Fault drills, short versions (`python -m bench.faults` runs the long ones): workers and a server SIGKILLed, lost
PostgreSQL connections, a corrupted adapter file in the store, and a full disk while an adapter is saved."""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool

from bench.faults import run_worker_drill
from bench.faults_server import (
    DB_UNAVAILABLE,
    REQUEST_TIMEOUT_S,
    app_database_url,
    blocked_backends,
    db_load,
    healthy_after,
    judge,
    run_upload_drill,
    terminate_backends,
)
from bench.processes import wait_for
from engines.tiny_model import CORPUS
from registry.adapters import km_lineage
from registry.aliases import get_alias
from registry.config import Settings
from registry.db import MSG_DB_UNAVAILABLE, DatabaseUnavailableError, database_unavailable, write_transaction
from registry.documents import DocumentCreate, content_hash, create_document
from registry.errors import MSG_CHECKSUM
from registry.models import Adapter, JobStatus
from server.app import create_app
from server.state import AppState
from tests.live_server import serve
from tests.served import admin_headers, register_km_versions
from tests.tiny import save_lora_for
from trainer_worker.worker import WorkerConfig, build_worker

torch.set_num_threads(2)
POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
# Small enough to train in seconds on a busy CPU.
TRAIN = {"method": "ddcd", "steps": 2, "eval_every": 2, "checkpoint_every": 2, "batch_size": 1, "grad_accum": 1,
         "window": 32, "max_dev_examples": 2}


# -- processes killed ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_sigkilled_mid_training_leave_one_km_per_document_and_no_orphans(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    report = run_worker_drill(tmp_path, tiny_model_dir, kills=2, documents=1, steps=60, seed=4)

    assert report["problems"] == []
    assert [kill["kind"] for kill in report["kills"]] == ["train_km", "train_km"]
    assert report["attempts"] == [3]  # two attempts killed, the third finished
    assert all(kill["target_step"] <= kill["step"] <= 60 for kill in report["kills"])  # 60: while publishing
    assert report["resumed_from_step"][0] is not None  # resumed from a checkpoint, not started over


@pytest.mark.slow
def test_server_sigkilled_mid_upload_leaves_no_half_document(tmp_path: Path, tiny_model_dir: Path) -> None:
    report = run_upload_drill(tmp_path / "data", tiny_model_dir, total=4 * 1024 * 1024)

    assert report["problems"] == []  # no row, no job, no store file; the restarted server took an upload
    assert report["documents_after_kill"] == 0
    assert 0 < report["killed_after_bytes"] < 4 * 1024 * 1024
    assert not report["upload_outcome"].isdigit(), "the upload got an answer: the kill came too late"


# -- PostgreSQL connections lost -----------------------------------------------------------------------------


def _blocked_request_answer(url: str, headers: dict[str, str], admin_url: str, name: str) -> httpx.Response:
    """GET /v1/documents while its query waits on a lock; its connection is terminated while it waits."""
    admin = create_engine(admin_url, poolclass=NullPool)
    with admin.connect() as conn, ThreadPoolExecutor(1) as pool:
        conn.execute(text("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE"))
        pending = pool.submit(httpx.get, f"{url}/v1/documents", headers=headers, timeout=REQUEST_TIMEOUT_S)
        wait_for(lambda: blocked_backends(admin_url, name) == 1, 20, "the request to wait on the lock")
        assert terminate_backends(admin_url, name) >= 1
        conn.rollback()
        answer = pending.result()
    admin.dispose()
    return answer


def _terminate_repeatedly(admin_url: str, name: str, times: int) -> Callable[[Callable[[str], None]], None]:
    def faults(mark: Callable[[str], None]) -> None:
        for _ in range(times):
            time.sleep(1.5)
            mark(f"terminated {terminate_backends(admin_url, name)}")
        time.sleep(1.5)

    return faults


def test_only_connection_errors_become_database_unavailable() -> None:
    lost = OperationalError("SELECT 1", {}, Exception("terminating connection due to administrator command"))
    assert isinstance(database_unavailable(lost), DatabaseUnavailableError)
    assert database_unavailable(IntegrityError("INSERT", {}, Exception("duplicate key"))) is None  # a bug: 500


def test_a_connection_lost_under_pre_ping_is_database_unavailable_whatever_error_the_cleanup_raised() -> None:
    import psycopg

    autocommit = "can't change 'autocommit' now: connection in transaction status ACTIVE"
    try:  # the pre-ping finds the connection dead, then the dialect's cleanup fails on it
        try:
            raise psycopg.OperationalError("connection socket closed")
        except psycopg.OperationalError:
            raise psycopg.ProgrammingError(autocommit)  # noqa: B904 (implicitly chained, as the dialect raises it)
    except psycopg.ProgrammingError as raised:
        after_loss = ProgrammingError("SELECT 1", {}, raised)
    assert isinstance(database_unavailable(after_loss), DatabaseUnavailableError)
    assert database_unavailable(ProgrammingError("SELECT 1", {}, psycopg.ProgrammingError(autocommit))) is None


@pytest.mark.parametrize("fresh_db_url", [POSTGRES], indirect=True)
def test_lost_postgres_connections_answer_json_503_and_the_server_recovers(
    fresh_db_url: str, app_settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    name = f"kmserve-test-{uuid.uuid4().hex[:8]}"
    app = create_app(app_settings.model_copy(update={"database_url": app_database_url(fresh_db_url, name)}))
    lora = save_lora_for(tiny_model_dir, tmp_path / "lora", seed=1)
    with serve(app) as url:
        state: AppState = app.state.kmserve
        headers = admin_headers(state)
        km = register_km_versions(state, [lora])

        answer = _blocked_request_answer(url, headers, fresh_db_url, name)
        assert answer.status_code == 503
        assert answer.json() == {"error": {"code": DB_UNAVAILABLE, "message": MSG_DB_UNAVAILABLE}}

        record = db_load(url, headers, km.document_id, clients=4, faults=_terminate_repeatedly(fresh_db_url, name, 3))
        report = judge(record)
        assert report["problem_count"] == 0, report["problems"]  # 200/202 or a JSON 503, nothing hung
        # Bounds are the request timeout, not speed: this CPU may be shared with heavier work.
        assert report["max_latency_s"] < REQUEST_TIMEOUT_S
        assert all(event["recovered_s"] is not None and event["recovered_s"] < REQUEST_TIMEOUT_S
                   for event in report["events"]), report
        assert healthy_after(url, headers, km.document_id) == []  # recovered without a restart


# -- the store damaged ---------------------------------------------------------------------------------------


def _flip_bytes(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _chat(client: TestClient, headers: dict[str, str], model: str) -> Any:
    return client.post("/v1/chat/completions", headers=headers, json={
        "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Where?"}]})


def test_corrupt_adapter_file_is_refused_while_the_good_version_keeps_serving(
    client: TestClient, state: AppState, tiny_model_dir: Path, tmp_path: Path
) -> None:
    loras = [save_lora_for(tiny_model_dir, tmp_path / f"lora-{n}", seed=n) for n in (1, 2)]
    km = register_km_versions(state, loras, alias=0)
    good, bad = km.adapter_ids
    headers = admin_headers(state)
    assert client.put("/admin/aliases/prod", headers=headers, json={"adapter_id": good}).status_code == 200
    assert _chat(client, headers, "prod").status_code == 200
    with state.sessions() as session:
        bad_uri = session.get(Adapter, bad).uri  # type: ignore[union-attr]
    _flip_bytes(Path(bad_uri) / "adapter_model.safetensors")

    loaded = client.post(f"/admin/adapters/{bad}/load", headers=headers)
    assert loaded.status_code == 503
    assert loaded.json()["error"]["code"] == "adapter_corrupt"
    key = Path(bad_uri).name
    assert loaded.json()["error"]["message"].startswith(MSG_CHECKSUM.partition(" (")[0].format(digest=key))
    assert _chat(client, headers, "prod").status_code == 200  # the alias at the good version serves on

    moved = client.put("/admin/aliases/prod", headers=headers, json={"adapter_id": bad})
    assert moved.status_code == 503 and moved.json()["error"]["code"] == "adapter_corrupt"
    aliases = client.get("/admin/aliases", headers=headers).json()["data"]
    assert [(a["adapter_id"], a["revision"]) for a in aliases if a["name"] == "prod"] == [(good, 1)]
    assert _chat(client, headers, "prod").status_code == 200  # the alias never left the good version
    assert client.get("/healthz").status_code == 200
    answer = client.post("/v1/query", headers=headers, json={"document_id": km.document_id, "question": "Where?",
                                                             "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["adapters"]["km"]["id"] == good
    assert client.put("/admin/aliases/prod", headers=headers, json={"adapter_id": good}).status_code == 200
    assert _chat(client, headers, "prod").status_code == 200


# -- the disk full -------------------------------------------------------------------------------------------


def _train_once(state: AppState, document_id: int, blob_uri: str) -> int:
    """Queue one train_km job (no retries) for the document and run it with a real worker; the job id."""
    payload = {"blob_uri": blob_uri, "media_type": "text/plain", "train": TRAIN}
    job = state.queue.enqueue("train_km", payload, max_attempts=1, document_id=document_id)
    worker = build_worker(state.settings, config=WorkerConfig(once=True, poll_seconds=0.02, max_poll_seconds=0.1))
    try:
        worker.run()
    finally:
        worker.close()
    return job.id


def _enospc_under(directory: Path) -> Any:
    """A stand-in for os.fsync that fails with ENOSPC for files below `directory` and syncs everything else."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    return mock.create_autospec(os.fsync, side_effect=fsync)


def test_disk_full_while_saving_an_adapter_fails_the_job_and_keeps_the_old_version(
    client: TestClient, state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = state.store.put_blob(CORPUS.encode(), ".txt")
    with write_transaction(state.sessions) as session:
        document, _ = create_document(session, DocumentCreate("disk", content_hash(CORPUS), len(CORPUS),
                                                              text_uri=blob.uri))
    assert state.queue.get(_train_once(state, document.id, blob.uri)).status == JobStatus.SUCCEEDED
    store = Path(state.settings.resolved_store_url)
    adapters_before = sorted(p.name for p in (store / "adapters").iterdir())

    fsync = _enospc_under(store / "tmp")
    monkeypatch.setattr(os, "fsync", fsync)
    job = state.queue.get(_train_once(state, document.id, blob.uri))
    monkeypatch.undo()

    assert fsync.called
    assert job.status == JobStatus.FAILED
    assert os.strerror(errno.ENOSPC) in (job.error or "")
    assert sorted(p.name for p in (store / "adapters").iterdir()) == adapters_before
    assert list((store / "tmp").iterdir()) == []  # the staged write was removed
    with state.sessions() as session:
        versions = session.scalars(select(Adapter.version).where(Adapter.lineage == km_lineage(document.id))).all()
        assert versions == [1]
        assert get_alias(session, km_lineage(document.id)).adapter.version == 1
    answer = client.post("/v1/query", headers=admin_headers(state), json={
        "document_id": document.id, "question": "What is the city called?", "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["adapters"]["km"]["version"] == 1
