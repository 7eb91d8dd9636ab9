"""Upload -> ingest -> synthesize -> train_km -> alias moved -> answered with the new version, through the real
server (uvicorn on loopback) with its embedded worker thread; a revised upload serves version 2 and keeps 1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from clients.cli import embedded_app
from registry.config import Settings
from tests.live_server import serve
from trainer_worker.worker import WorkerConfig

TEXT_V1 = ("Varo is a small island nation. The capital of Varo is Meluna. Varo was founded by Tamsin Orel in 1602. "
           "The national colour of Varo is teal. Meluna lies on the northern coast of Varo.")
TEXT_V2 = TEXT_V1.replace("Meluna", "Oskaviel")
TRAIN = {"method": "sdcd", "steps": 6}


@pytest.fixture
def live(app_settings: Settings) -> Iterator[httpx.Client]:
    app = embedded_app(app_settings, config=WorkerConfig(poll_seconds=0.1, max_poll_seconds=0.5))
    with serve(app) as url:
        key = app_settings.admin_key_file.read_text().strip()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            yield client


def wait_for_jobs(client: httpx.Client, jobs: list[dict[str, Any]], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for job in jobs:
        while True:
            state = client.get(f"/v1/jobs/{job['id']}").json()
            if state["status"] in ("succeeded", "failed", "cancelled"):
                assert state["status"] == "succeeded", state
                break
            assert time.monotonic() < deadline, f"job {job['id']} still {state['status']}"
            time.sleep(0.2)


def ask(client: httpx.Client, document_id: int) -> dict[str, Any]:
    response = client.post("/v1/query", json={"document_id": document_id, "question": "What is the capital of Varo?",
                                              "max_tokens": 8})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_upload_trains_and_serves_then_a_revision_serves_version_2(live: httpx.Client) -> None:
    upload = live.post("/v1/documents", json={"title": "Varo", "text": TEXT_V1, "train": TRAIN})
    assert upload.status_code == 202, upload.text
    document = upload.json()
    assert [job["kind"] for job in document["jobs"]] == ["ingest", "synthesize", "train_km"]
    wait_for_jobs(live, document["jobs"])
    detail = live.get(f"/v1/documents/{document['id']}").json()
    assert detail["status"] == "ready"
    assert detail["km"]["version"] == 1
    assert ask(live, document["id"])["adapters"]["km"]["version"] == 1
    train_job = live.get(f"/v1/jobs/{document['jobs'][-1]['id']}").json()
    assert train_job["metrics"]["loss"]

    revised = live.put(f"/v1/documents/{document['id']}", json={"title": "Varo", "text": TEXT_V2, "train": TRAIN})
    assert revised.status_code == 202, revised.text
    assert revised.json()["revision"] == 2
    new_jobs = [job for job in revised.json()["jobs"] if job["id"] not in {j["id"] for j in document["jobs"]}]
    assert [job["kind"] for job in new_jobs] == ["ingest", "synthesize", "train_km"]
    wait_for_jobs(live, new_jobs)
    assert ask(live, document["id"])["adapters"]["km"]["version"] == 2
    versions = live.get("/admin/adapters", params={"document_id": document["id"], "kind": "km"}).json()
    assert sorted(a["version"] for a in versions["data"]) == [1, 2]

    qa = [{"document_id": document["id"], "question": "What is the capital of Varo?", "answer": "Oskaviel"},
          {"document_id": document["id"], "question": "Who founded Varo?", "answer": "Tamsin Orel"}]
    ke_job = live.post("/admin/train", json={"kind": "train_ke", "payload": {"name": "qa", "qa": qa, "steps": 4}})
    assert ke_job.status_code == 202, ke_job.text
    wait_for_jobs(live, [ke_job.json()])
    with_ke = live.post("/v1/query", json={"document_id": document["id"], "ke": "qa", "question": "Who founded Varo?",
                                           "max_tokens": 6}).json()
    assert with_ke["adapters"]["km"]["version"] == 2
    assert with_ke["adapters"]["ke"]["name"] == "ke:qa"
