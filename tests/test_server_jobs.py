"""Job routes through the real app: read, cancel, retry, admin listing and training, and server-sent events."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from registry.api_keys import create_api_key
from registry.config import Settings
from registry.db import transaction
from registry.errors import MSG_JOB_STATE
from registry.queue_types import MSG_NOT_CANCELLABLE, MSG_NOT_RETRYABLE
from server.app import create_app
from server.services.jobs import refresh_queue_metrics
from server.sse import StreamSettings, format_comment, format_event, get_stream_settings, poll_stream
from server.state import AppState

TEXT = "Varo exports salt and glass. Its capital is Lumen.\n"
FAST = StreamSettings(poll_seconds=0.02, heartbeat_seconds=0.1)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The events of an SSE body: id, event and JSON data of each (comment lines become {'comment': ...})."""
    events = []
    for block in text.strip().split("\n\n"):
        event: dict[str, Any] = {}
        for line in block.splitlines():
            field, _, value = line.partition(": ")
            if field == "":
                event["comment"] = value
            else:
                event[field] = json.loads(value) if field == "data" else value
        events.append(event)
    return events


@pytest.fixture
def app(app_settings: Settings) -> FastAPI:
    app = create_app(app_settings)
    app.dependency_overrides[get_stream_settings] = lambda: FAST
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def state(client: TestClient) -> AppState:
    return client.app.state.kmserve  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def admin(state: AppState) -> dict[str, str]:
    return {"Authorization": f"Bearer {state.settings.admin_key_file.read_text().strip()}"}


def key_for(state: AppState, *scopes: str, tenant: str = "default") -> dict[str, str]:
    with transaction(state.sessions) as session:
        _, plaintext = create_api_key(session, "test", scopes, tenant=tenant)
    return {"Authorization": f"Bearer {plaintext}"}


def upload(client: TestClient, headers: dict[str, str], text: str = TEXT) -> list[dict[str, Any]]:
    response = client.post("/v1/documents", json={"title": "Varo", "text": text}, headers=headers)
    assert response.status_code == 202, response.text
    jobs: list[dict[str, Any]] = response.json()["jobs"]
    return jobs


def assert_error(response: Any, status: int, code: str, message: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    if message is not None:
        assert response.json()["error"]["message"] == message


def test_get_job_reports_progress_and_metrics(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    ingest = upload(client, admin)[0]
    state.queue.claim("w1", ["ingest"])
    state.queue.progress(ingest["id"], "w1", 0.25, "chunking", {"loss": [2.5, 2.1]})
    job = client.get(f"/v1/jobs/{ingest['id']}", headers=key_for(state, "query")).json()
    assert (job["kind"], job["status"], job["progress"], job["message"]) == ("ingest", "running", 0.25, "chunking")
    assert (job["metrics"], job["attempts"], job["error"]) == ({"loss": [2.5, 2.1]}, 1, None)
    assert job["started_at"] is not None
    assert job["finished_at"] is None
    assert_error(client.get("/v1/jobs/999999", headers=admin), 404, "not_found")


def test_cancel_queued_running_and_finished(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    first, second = upload(client, admin), upload(client, admin, text="other " + TEXT)
    cancelled = client.post(f"/v1/jobs/{first[0]['id']}/cancel", headers=admin).json()
    assert cancelled["status"] == "cancelled"
    assert {client.get(f"/v1/jobs/{j['id']}", headers=admin).json()["status"] for j in first[1:]} == {"cancelled"}
    again = client.post(f"/v1/jobs/{first[0]['id']}/cancel", headers=admin)
    message = MSG_JOB_STATE.format(job_id=first[0]["id"], status="cancelled", detail=MSG_NOT_CANCELLABLE)
    assert_error(again, 409, "job_state", message)
    state.queue.claim("w1", ["ingest"])
    running = client.post(f"/v1/jobs/{second[0]['id']}/cancel", headers=admin).json()
    assert (running["status"], running["cancel_requested"]) == ("running", True)
    assert_error(client.post(f"/v1/jobs/{second[0]['id']}/cancel", headers=key_for(state, "query")), 403, "forbidden")


def test_admin_retry_requeues_the_chain(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    jobs = upload(client, admin)
    client.post(f"/v1/jobs/{jobs[0]['id']}/cancel", headers=admin)
    retried = client.post(f"/admin/jobs/{jobs[0]['id']}/retry", headers=admin)
    assert retried.status_code == 200, retried.text
    assert (retried.json()["status"], retried.json()["attempts"]) == ("queued", 0)
    assert {client.get(f"/v1/jobs/{j['id']}", headers=admin).json()["status"] for j in jobs} == {"queued"}
    message = MSG_JOB_STATE.format(job_id=jobs[0]["id"], status="queued", detail=MSG_NOT_RETRYABLE)
    assert_error(client.post(f"/admin/jobs/{jobs[0]['id']}/retry", headers=admin), 409, "job_state", message)
    upload_key = key_for(state, "upload", "query")
    assert_error(client.post(f"/admin/jobs/{jobs[0]['id']}/retry", headers=upload_key), 403, "forbidden")


def test_admin_lists_jobs_with_filters(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    first, second = upload(client, admin), upload(client, admin, text="other " + TEXT)
    client.post(f"/v1/jobs/{second[0]['id']}/cancel", headers=admin)

    def listed(**params: Any) -> tuple[int, list[int]]:
        body = client.get("/admin/jobs", params=params, headers=admin).json()
        return body["count"], [j["id"] for j in body["data"]]

    assert listed() == (6, [j["id"] for j in (first + second)][::-1])
    assert listed(status="cancelled") == (3, [j["id"] for j in second][::-1])
    assert listed(kind="ingest") == (2, [second[0]["id"], first[0]["id"]])
    assert listed(document_id=first[0]["document_id"], limit=2) == (3, [first[2]["id"], first[1]["id"]])
    assert listed(status="queued", kind="train_km") == (1, [first[2]["id"]])
    assert_error(client.get("/admin/jobs", params={"status": "done"}, headers=admin), 422, "validation_error")


def test_admin_train_queues_a_job(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    document_id = upload(client, admin)[0]["document_id"]
    body = {"kind": "train_ke", "payload": {"documents": [document_id], "steps": 5}, "document_id": document_id}
    response = client.post("/admin/train", json=body, headers=admin)
    assert response.status_code == 202, response.text
    job = state.queue.get(response.json()["id"])
    assert (job.kind, job.payload, job.document_id, job.tenant) == ("train_ke", body["payload"], document_id, "default")
    assert client.post("/admin/train", json={"kind": "train_reranker"}, headers=admin).status_code == 202
    assert_error(client.post("/admin/train", json={"kind": "mine_bitcoin"}, headers=admin), 422, "validation_error")
    missing = client.post("/admin/train", json={"kind": "train_km", "document_id": 999999}, headers=admin)
    assert_error(missing, 404, "not_found")


def test_other_tenants_jobs_are_404(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    job_id = upload(client, admin)[0]["id"]
    other = key_for(state, "admin", tenant="acme")
    for method, path in [("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"),
                         ("POST", f"/v1/jobs/{job_id}/cancel"), ("POST", f"/admin/jobs/{job_id}/retry")]:
        assert_error(client.request(method, path, headers=other), 404, "not_found")
    assert client.get("/admin/jobs", headers=other).json() == {"data": [], "count": 0}
    document_id = state.queue.get(job_id).document_id
    foreign = client.post("/admin/train", json={"kind": "train_km", "document_id": document_id}, headers=other)
    assert_error(foreign, 404, "not_found")


def test_events_of_an_ended_job_then_end(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    job_id = upload(client, admin, text="none " + TEXT)[0]["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=admin)
    response = client.get(f"/v1/jobs/{job_id}/events", headers=admin)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [e["event"] for e in events] == ["queued", "cancelled", "end"]
    assert [e["data"]["job_id"] for e in events[:2]] == [job_id, job_id]
    assert [e["id"] for e in events[:2]] == [str(e["data"]["id"]) for e in events[:2]]
    assert "id" not in events[-1]
    assert (events[-1]["data"]["id"], events[-1]["data"]["status"]) == (job_id, "cancelled")
    first_id = events[0]["id"]
    after = parse_sse(client.get(f"/v1/jobs/{job_id}/events", params={"after": first_id}, headers=admin).text)
    resumed = parse_sse(client.get(f"/v1/jobs/{job_id}/events", headers={**admin, "Last-Event-ID": first_id}).text)
    assert [e["event"] for e in after] == [e["event"] for e in resumed] == ["cancelled", "end"]


def test_refresh_queue_metrics_sets_the_jobs_gauge(client: TestClient, state: AppState, admin: dict[str, str]) -> None:
    jobs = upload(client, admin)
    client.post(f"/v1/jobs/{jobs[0]['id']}/cancel", headers=admin)
    upload(client, admin, text="other " + TEXT)
    metrics = client.app.state.metrics  # type: ignore[attr-defined]
    refresh_queue_metrics(state, metrics)
    text = client.get("/metrics").text
    assert 'kmserve_jobs{status="queued"} 3.0' in text
    assert 'kmserve_jobs{status="cancelled"} 3.0' in text
    assert 'kmserve_jobs{status="running"} 0.0' in text


# -- the polling stream on its own -----------------------------------------------------------------------------


def run_stream(polls: list[tuple[list[str], bool]], disconnect_after: int | None = None) -> list[str]:
    """Drive poll_stream with scripted polls; the client 'disconnects' after `disconnect_after` checks."""
    checks = 0

    async def poll() -> tuple[list[str], bool]:
        return polls.pop(0)

    async def is_disconnected() -> bool:
        nonlocal checks
        checks += 1
        return disconnect_after is not None and checks > disconnect_after

    async def collect() -> list[str]:
        settings = StreamSettings(poll_seconds=0.0, heartbeat_seconds=0.05)
        return [chunk async for chunk in poll_stream(poll, is_disconnected, settings, clock=clock)]

    ticks = iter(range(1000))

    def clock() -> float:
        return next(ticks) * 0.02  # each reading of the clock is 20 ms later

    return asyncio.run(collect())


def test_poll_stream_sends_heartbeats_while_idle_and_stops_when_done() -> None:
    chunks = run_stream([([], False)] * 6 + [(["a", "b"], True)])
    assert chunks.count(format_comment()) >= 1
    assert chunks[-2:] == ["a", "b"]


def test_poll_stream_stops_when_the_client_leaves() -> None:
    polls = [(["x"], False)] * 10
    assert run_stream(polls, disconnect_after=3) == ["x", "x", "x"]
    assert len(polls) == 7


def test_format_event() -> None:
    assert format_event({"a": 1}, event="progress", event_id=7) == 'id: 7\nevent: progress\ndata: {"a":1}\n\n'
    assert format_event([1]) == "data: [1]\n\n"


# -- a real server on loopback ---------------------------------------------------------------------------------


@pytest.fixture
def served(app: FastAPI) -> Iterator[tuple[str, AppState]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.kmserve
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()
    assert not thread.is_alive(), "the server did not stop (a stream outlived its client?)"


def test_upload_and_follow_a_job_over_http(served: tuple[str, AppState]) -> None:
    base_url, state = served
    headers = {"Authorization": f"Bearer {state.settings.admin_key_file.read_text().strip()}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        response = http.post("/v1/documents", files={"file": ("varo.md", f"# Varo\n{TEXT}".encode())})
        assert response.status_code == 202, response.text
        ingest_id = response.json()["jobs"][0]["id"]
        seen: list[dict[str, Any]] = []
        driven = False
        with http.stream("GET", f"/v1/jobs/{ingest_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            buffer = ""
            for text in stream.iter_text():
                buffer += text
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    seen.extend(e for e in parse_sse(block + "\n\n") if "event" in e)
                    if seen and not driven:
                        drive_ingest(state, ingest_id)
                        driven = True
        train_km_id = response.json()["jobs"][-1]["id"]
        with http.stream("GET", f"/v1/jobs/{train_km_id}/events") as unfinished:
            first = next(unfinished.iter_text())  # then the client leaves while the job is still queued
        assert "event: queued" in first
    assert [e["event"] for e in seen] == ["queued", "claimed", "progress", "succeeded", "end"]
    assert seen[2]["data"]["data"]["metrics"] == {"loss": [1.5]}
    assert seen[-1]["data"]["status"] == "succeeded"


def drive_ingest(state: AppState, job_id: int) -> None:
    """Do what a worker would: claim, report progress and complete the job, from the test thread."""
    job = state.queue.claim("test-worker", ["ingest"])
    assert job is not None
    assert job.id == job_id
    state.queue.progress(job_id, "test-worker", 0.5, "halfway", {"loss": [1.5]})
    state.queue.complete(job_id, "test-worker", {"chunks": 1})
