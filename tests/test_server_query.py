"""POST /v1/query through the real app: KM versions, hot swap, KM+KE combined, errors, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from registry.models import AdapterKind
from registry.queue import JobSpec
from server.services.resolver import MSG_TRAINING
from server.state import AppState
from tests.served import admin_headers, register_ke, register_km_versions
from tests.tiny import save_lora_for


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("served-loras")
    return [save_lora_for(tiny_model_dir, root / f"l{i}", seed=i) for i in range(3)]


def ask(client: TestClient, state: AppState, **body: object) -> dict[str, object]:
    response = client.post("/v1/query", json={"question": "What is the capital of Varo?", **body},
                           headers=admin_headers(state))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_query_reports_the_km_version_and_follows_alias_moves(
    client: TestClient, state: AppState, lora_dirs: list[Path]
) -> None:
    km = register_km_versions(state, lora_dirs[:2])
    first = ask(client, state, document_id=km.document_id, max_tokens=8)
    assert first["adapters"]["km"] == {"id": km.adapter_ids[0], "name": f"km:{km.document_id}", "version": 1}
    assert first["usage"]["completion_tokens"] >= 1
    assert set(first["timings_ms"]) >= {"resolve", "adapter", "generate", "total"}
    moved = client.put(f"/admin/aliases/km:{km.document_id}", json={"adapter_id": km.adapter_ids[1]},
                       headers=admin_headers(state))
    assert moved.status_code == 200
    second = ask(client, state, document_id=km.document_id, max_tokens=8)
    assert second["adapters"]["km"]["version"] == 2


def test_km_changes_the_answer_compared_to_base(client: TestClient, state: AppState, lora_dirs: list[Path]) -> None:
    km = register_km_versions(state, lora_dirs[:1], text="other doc")
    with_km = ask(client, state, document_id=km.document_id, max_tokens=12)
    base = ask(client, state, km=state.base_model_id, max_tokens=12)
    assert base["adapters"] == {"km": None, "ke": None}
    assert with_km["answer"] != base["answer"]


def test_km_plus_ke_is_served_as_one_cached_combined_adapter(
    client: TestClient, state: AppState, lora_dirs: list[Path]
) -> None:
    km = register_km_versions(state, lora_dirs[:1], text="ke doc")
    ke_id = register_ke(state, lora_dirs[2], "quality", layer_weights={"km": [0.5, 0.5], "ke": [0.5, 0.7]})
    body = {"document_id": km.document_id, "ke": "quality", "max_tokens": 6}
    first = ask(client, state, **body)
    assert first["adapters"]["ke"] == {"id": ke_id, "name": "ke:quality", "version": 1}
    ask(client, state, **body)
    combined = client.get("/admin/adapters", params={"kind": AdapterKind.COMBINED.value},
                          headers=admin_headers(state))
    assert combined.status_code == 200
    assert combined.json()["count"] == 1
    loaded = state.require_generator().stats().loaded
    assert len([a for a in loaded if a not in (km.adapter_ids[0], ke_id)]) == 1


def test_unknown_document_is_404(client: TestClient, state: AppState) -> None:
    response = client.post("/v1/query", json={"document_id": 999999, "question": "q"}, headers=admin_headers(state))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_km_still_training_is_409_with_the_job(client: TestClient, state: AppState, lora_dirs: list[Path]) -> None:
    km = register_km_versions(state, lora_dirs[:1], text="training doc")
    client.delete(f"/admin/aliases/km:{km.document_id}", headers=admin_headers(state))
    job = state.queue.enqueue_chain([JobSpec("train_km", document_id=km.document_id)])[0]
    response = client.post("/v1/query", json={"document_id": km.document_id, "question": "q"},
                           headers=admin_headers(state))
    assert response.status_code == 409
    assert response.json()["error"] == {
        "code": "km_not_ready", "message": MSG_TRAINING.format(document_id=km.document_id, job_id=job.id)}


def test_rerank_searches_only_the_tenants_documents(client: TestClient, state: AppState) -> None:
    body = {"km": state.base_model_id, "question": "q", "rag": {"top_k": 3, "rerank": True, "document_ids": [999]}}
    response = client.post("/v1/query", json=body, headers=admin_headers(state))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_bad_requests_are_json_errors(client: TestClient, state: AppState) -> None:
    headers = admin_headers(state)
    both = client.post("/v1/query", json={"document_id": 1, "km": "x", "question": "q"}, headers=headers)
    too_long = client.post("/v1/query", json={"km": state.base_model_id, "question": "q", "max_tokens": 100000},
                           headers=headers)
    bad_model = client.post("/v1/query", json={"km": "no-such-alias", "question": "q"}, headers=headers)
    assert (both.status_code, too_long.status_code, bad_model.status_code) == (422, 422, 400)
    assert too_long.json()["error"]["code"] == "max_tokens_too_large"
    assert bad_model.json()["error"]["code"] == "invalid_model"


def test_query_needs_a_key(client: TestClient) -> None:
    assert client.post("/v1/query", json={"document_id": 1, "question": "q"}).status_code == 401


def test_streaming_deltas_match_the_answer(client: TestClient, state: AppState, lora_dirs: list[Path]) -> None:
    km = register_km_versions(state, lora_dirs[:1], text="stream doc")
    body = {"document_id": km.document_id, "question": "Who founded Varo?", "max_tokens": 10}
    whole = ask(client, state, **body)
    with client.stream("POST", "/v1/query", json={**body, "stream": True}, headers=admin_headers(state)) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events("".join(resp.iter_text()))
    deltas = "".join(data["delta"] for name, data in events if name == "delta")
    (done,) = [data for name, data in events if name == "done"]
    assert deltas.strip() == whole["answer"] == done["answer"]
    assert done["adapters"]["km"]["version"] == 1


def _sse_events(text: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events
