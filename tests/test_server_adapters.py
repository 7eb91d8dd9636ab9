"""Admin adapter and engine routes through the real app: uploads checked against the served tiny model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from engines.errors import MSG_NOT_LOADED
from engines.model_shapes import (
    MSG_MODULE_MISSING,
    MSG_RANK_TOO_LARGE,
    MSG_SHAPE_MISMATCH,
    MSG_TARGETS_MISSING,
    base_module_shapes,
)
from registry.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from registry.config import Settings
from registry.db import transaction
from registry.errors import MSG_ADAPTER_IN_USE, MSG_NOT_FOUND, MSG_UNSAFE_FORMAT
from registry.models import AdapterStatus
from server.app import create_app
from server.auth import MSG_NO_SCOPE
from server.errors import MSG_TOO_LARGE
from server.services.adapter_uploads import (
    MSG_KM_NEEDS_DOCUMENT,
    MSG_LINEAGE_REQUIRED,
    MSG_MISSING_FILE,
)
from server.services.admin_adapters import MSG_NOT_READY
from server.state import AppState
from tests.factories import make_adapter, make_document
from tests.tiny import save_lora, save_lora_for, tiny_llama

MAX_RANK = 8
MODEL_NAME = "kmserve-tiny"
Q_PROJ = "model.layers.0.self_attn.q_proj"


class Response(Protocol):
    """What the tests read of a TestClient response."""

    status_code: int

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "good": save_lora_for(tiny_model_dir, root / "good", seed=1),
        "good2": save_lora_for(tiny_model_dir, root / "good2", seed=2),
        "big_rank": save_lora_for(tiny_model_dir, root / "big_rank", seed=3, r=16),
        "foreign": save_lora(root / "foreign", 4, tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"]),
    }


@pytest.fixture
def settings(app_settings: Settings) -> Settings:
    return app_settings.model_copy(update={"max_adapter_rank": MAX_RANK})


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def admin(settings: Settings, client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_key_file.read_text().strip()}"}


def _state(client: TestClient) -> AppState:
    state: AppState = client.app.state.kmserve  # type: ignore[attr-defined]
    return state


def _document(client: TestClient, tenant: str = "default") -> int:
    with transaction(_state(client).sessions) as session:
        return make_document(session, tenant=tenant).id


def _files(lora: Path, weights_name: str = WEIGHTS_NAME) -> dict[str, tuple[str, bytes]]:
    return {"adapter_config": (CONFIG_NAME, (lora / CONFIG_NAME).read_bytes()),
            "adapter_model": (weights_name, (lora / WEIGHTS_NAME).read_bytes())}


def _upload(client: TestClient, headers: dict[str, str], lora: Path, **form: object) -> Response:
    return client.post("/admin/adapters", data={k: str(v) for k, v in form.items()}, files=_files(lora),
                       headers=headers)


def _km(client: TestClient, admin: dict[str, str], lora: Path, document_id: int) -> dict[str, Any]:
    response = _upload(client, admin, lora, kind="km", document_id=document_id)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _error(response: Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    message: str = response.json()["error"]["message"]
    return message


def _assert_nothing_written(client: TestClient, admin: dict[str, str]) -> None:
    assert client.get("/admin/adapters", headers=admin).json()["count"] == 0
    assert _state(client).store.list_keys() == []


def _copy(lora: Path, out: Path) -> Path:
    shutil.copytree(lora, out)
    return out


def _edit_config(lora: Path, **changes: Any) -> None:
    config = json.loads((lora / CONFIG_NAME).read_text())
    (lora / CONFIG_NAME).write_text(json.dumps({**config, **changes}))


# -- uploads --------------------------------------------------------------------------------------------------


def test_upload_km_sets_alias_and_is_listed(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    doc = _document(client)
    created = _km(client, admin, loras["good"], doc)
    assert (created["kind"], created["lineage"], created["version"]) == ("km", f"km:{doc}", 1)
    assert (created["rank"], created["alpha"], created["base_model"]) == (4, 8.0, MODEL_NAME)
    assert created["target_modules"] == ["q_proj", "v_proj"]
    assert created["aliases"] == [f"km:{doc}"] and created["writer_versions"]
    listed = client.get("/admin/adapters", params={"document_id": doc}, headers=admin).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == created["id"]
    got = client.get(f"/admin/adapters/{created['id']}", headers=admin).json()
    assert got == created
    aliases = {a["name"]: a["adapter_id"] for a in client.get("/admin/aliases", headers=admin).json()["data"]}
    assert aliases[f"km:{doc}"] == created["id"]


def test_second_upload_is_version_2_and_moves_alias(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path]
) -> None:
    doc = _document(client)
    first = _km(client, admin, loras["good"], doc)
    second = _km(client, admin, loras["good2"], doc)
    assert second["version"] == 2 and second["aliases"] == [f"km:{doc}"]
    assert client.get(f"/admin/adapters/{first['id']}", headers=admin).json()["aliases"] == []


@pytest.mark.parametrize("no_alias", ["false", "None"])
def test_km_upload_with_alias_false_sets_none(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path], no_alias: str
) -> None:
    response = _upload(client, admin, loras["good"], kind="km", document_id=_document(client), alias=no_alias)
    assert response.status_code == 201 and response.json()["aliases"] == []
    assert client.get("/admin/aliases", headers=admin).json()["count"] == 0


def test_upload_as_files_list_with_alias(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    lora = loras["good"]
    files = [("files", (CONFIG_NAME, (lora / CONFIG_NAME).read_bytes())),
             ("files", (WEIGHTS_NAME, (lora / WEIGHTS_NAME).read_bytes())),
             ("files", ("README.md", b"# ignored"))]
    response = client.post("/admin/adapters", data={"kind": "ke", "lineage": "ke:qa", "alias": "ke:qa"},
                           files=files, headers=admin)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["kind"], body["lineage"], body["document_id"], body["aliases"]) == ("ke", "ke:qa", None, ["ke:qa"])


def test_query_key_is_refused(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    created = client.post("/admin/keys", json={"name": "q", "scopes": ["query"]}, headers=admin).json()
    query = {"Authorization": f"Bearer {created['key']}"}
    upload = _upload(client, query, loras["good"], kind="ke", lineage="ke:x")
    assert _error(upload, 403, "forbidden") == MSG_NO_SCOPE.format(scope="admin")
    assert client.get("/admin/engine", headers=query).status_code == 403
    assert client.get("/admin/adapters", headers=query).status_code == 403
    _assert_nothing_written(client, admin)


def test_pickle_weights_are_415_and_nothing_is_written(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path]
) -> None:
    response = client.post("/admin/adapters", data={"kind": "ke", "lineage": "ke:x"},
                           files=_files(loras["good"], weights_name="adapter_model.bin"), headers=admin)
    assert _error(response, 415, "unsafe_adapter_format") == MSG_UNSAFE_FORMAT.format(name="adapter_model.bin")
    _assert_nothing_written(client, admin)


def test_pickle_in_files_list_is_415(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    files = [("files", (CONFIG_NAME, (loras["good"] / CONFIG_NAME).read_bytes())), ("files", ("weights.pt", b"x"))]
    response = client.post("/admin/adapters", data={"kind": "ke", "lineage": "ke:x"}, files=files, headers=admin)
    _error(response, 415, "unsafe_adapter_format")
    _assert_nothing_written(client, admin)


def test_rank_above_limit_is_422(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    response = _upload(client, admin, loras["big_rank"], kind="ke", lineage="ke:x")
    assert _error(response, 422, "adapter_rank_too_large") == MSG_RANK_TOO_LARGE.format(rank=16, limit=MAX_RANK)
    _assert_nothing_written(client, admin)


def test_on_vllm_the_rank_limit_is_also_the_rank_its_lora_slots_hold(settings: Settings) -> None:
    assert AppState.start(settings).max_adapter_rank == MAX_RANK
    vllm = settings.model_copy(update={"engine": "vllm", "max_adapter_rank": 64, "vllm_max_lora_rank": 16})
    assert AppState.start(vllm).max_adapter_rank == 16  # a rank-32 upload would load into no slot
    assert AppState.start(vllm.model_copy(update={"vllm_max_lora_rank": 128})).max_adapter_rank == 64


def test_adapter_of_another_model_is_422_naming_the_module(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path]
) -> None:
    response = _upload(client, admin, loras["foreign"], kind="km", document_id=_document(client))
    message = _error(response, 422, "adapter_base_mismatch")
    assert message == MSG_SHAPE_MISMATCH.format(module=Q_PROJ, model=MODEL_NAME, a=[4, 32], b=[32, 4],
                                                in_features=64, out_features=64)
    _assert_nothing_written(client, admin)


def test_module_the_model_lacks_is_422(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path], tmp_path: Path
) -> None:
    lora = _copy(loras["good"], tmp_path / "renamed")
    tensors = load_file(lora / WEIGHTS_NAME)
    save_file({k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}, lora / WEIGHTS_NAME)
    _edit_config(lora, target_modules=["qkv_proj", "v_proj"])
    message = _error(_upload(client, admin, lora, kind="ke", lineage="ke:x"), 422, "adapter_base_mismatch")
    assert message == MSG_MODULE_MISSING.format(module="model.layers.0.self_attn.qkv_proj", model=MODEL_NAME)
    _assert_nothing_written(client, admin)


def test_target_module_the_model_lacks_is_422(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path], tmp_path: Path
) -> None:
    lora = _copy(loras["good"], tmp_path / "targets")
    _edit_config(lora, target_modules=["q_proj", "v_proj", "c_attn"])
    message = _error(_upload(client, admin, lora, kind="ke", lineage="ke:x"), 422, "adapter_base_mismatch")
    assert message == MSG_TARGETS_MISSING.format(targets=["c_attn"], model=MODEL_NAME)
    _assert_nothing_written(client, admin)


def test_config_rank_disagreeing_with_tensors_is_422(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path], tmp_path: Path
) -> None:
    lora = _copy(loras["good"], tmp_path / "mismatch")
    _edit_config(lora, r=8)
    message = _error(_upload(client, admin, lora, kind="ke", lineage="ke:x"), 422, "invalid_adapter")
    assert "do not have the config's rank 8" in message
    _assert_nothing_written(client, admin)


def test_truncated_safetensors_is_422(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path], tmp_path: Path
) -> None:
    lora = _copy(loras["good"], tmp_path / "truncated")
    data = (lora / WEIGHTS_NAME).read_bytes()
    (lora / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])
    message = _error(_upload(client, admin, lora, kind="ke", lineage="ke:x"), 422, "invalid_adapter")
    assert WEIGHTS_NAME in message
    _assert_nothing_written(client, admin)


def test_pickle_renamed_safetensors_is_422(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path], tmp_path: Path
) -> None:
    lora = _copy(loras["good"], tmp_path / "pickled")
    torch.save(load_file(lora / WEIGHTS_NAME), lora / WEIGHTS_NAME)
    _error(_upload(client, admin, lora, kind="ke", lineage="ke:x"), 422, "invalid_adapter")
    _assert_nothing_written(client, admin)


def test_upload_over_size_limit_is_413(app_settings: Settings, loras: dict[str, Path]) -> None:
    limit = 1000
    with TestClient(create_app(app_settings.model_copy(update={"max_upload_bytes": limit}))) as small:
        headers = {"Authorization": f"Bearer {app_settings.admin_key_file.read_text().strip()}"}
        response = _upload(small, headers, loras["good"], kind="ke", lineage="ke:x")
        assert _error(response, 413, "payload_too_large") == MSG_TOO_LARGE.format(what="adapter", limit=limit)
        _assert_nothing_written(small, headers)


def test_bad_forms_are_refused(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    good = loras["good"]
    no_doc = _upload(client, admin, good, kind="km")
    assert _error(no_doc, 422, "invalid_upload") == MSG_KM_NEEDS_DOCUMENT
    no_lineage = _upload(client, admin, good, kind="reranker")
    assert _error(no_lineage, 422, "invalid_upload") == MSG_LINEAGE_REQUIRED.format(kind="reranker")
    _error(_upload(client, admin, good, kind="ke", lineage="ke:a+b"), 422, "invalid_upload")
    _error(_upload(client, admin, good, kind="combined", lineage="x"), 422, "validation_error")
    foreign = _upload(client, admin, good, kind="km", document_id=_document(client, tenant="other"))
    _error(foreign, 404, "not_found")
    only_config = client.post("/admin/adapters", data={"kind": "ke", "lineage": "ke:x"},
                              files={"adapter_config": (CONFIG_NAME, b"{}")}, headers=admin)
    assert _error(only_config, 422, "invalid_upload") == MSG_MISSING_FILE.format(names=WEIGHTS_NAME)
    _assert_nothing_written(client, admin)


def test_lineage_of_another_kind_is_409(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    assert _upload(client, admin, loras["good"], kind="ke", lineage="ke:x").status_code == 201
    _error(_upload(client, admin, loras["good2"], kind="compressor", lineage="ke:x"), 409, "lineage_conflict")


# -- listing, reading, deleting ----------------------------------------------------------------------------------


def test_list_filters_and_pages(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    km = _km(client, admin, loras["good"], _document(client))
    ke = _upload(client, admin, loras["good2"], kind="ke", lineage="ke:x").json()
    by_kind = client.get("/admin/adapters", params={"kind": "ke"}, headers=admin).json()
    assert [a["id"] for a in by_kind["data"]] == [ke["id"]]
    by_lineage = client.get("/admin/adapters", params={"lineage": km["lineage"]}, headers=admin).json()
    assert [a["id"] for a in by_lineage["data"]] == [km["id"]]
    page = client.get("/admin/adapters", params={"limit": 1, "offset": 1}, headers=admin).json()
    assert page["count"] == 2 and [a["id"] for a in page["data"]] == [km["id"]]


def test_other_tenants_adapters_are_404(client: TestClient, admin: dict[str, str]) -> None:
    with transaction(_state(client).sessions) as session:
        foreign = make_adapter(session, tenant="other").id
    # The first-start key is an operator's (it reaches every tenant); a tenant admin key does not.
    created = client.post("/admin/keys", json={"name": "tenant admin", "scopes": ["admin"]}, headers=admin)
    tenant_admin = {"Authorization": f"Bearer {created.json()['key']}"}
    assert client.get("/admin/adapters", headers=tenant_admin).json()["count"] == 0
    for response in (client.get(f"/admin/adapters/{foreign}", headers=tenant_admin),
                     client.delete(f"/admin/adapters/{foreign}", headers=tenant_admin),
                     client.post(f"/admin/adapters/{foreign}/load", headers=tenant_admin)):
        assert _error(response, 404, "not_found") == MSG_NOT_FOUND.format(what="adapter", ref=foreign)


def test_delete_aliased_is_409_then_204(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    doc = _document(client)
    created = _km(client, admin, loras["good"], doc)
    refused = client.delete(f"/admin/adapters/{created['id']}", headers=admin)
    assert _error(refused, 409, "adapter_in_use") == MSG_ADAPTER_IN_USE.format(
        adapter_id=created["id"], aliases=f"km:{doc}")
    assert client.delete(f"/admin/aliases/km:{doc}", headers=admin).status_code == 204
    assert client.delete(f"/admin/adapters/{created['id']}", headers=admin).status_code == 204
    _error(client.get(f"/admin/adapters/{created['id']}", headers=admin), 404, "not_found")
    assert _state(client).store.exists(created["uri"])  # the blob is left for GC


def test_delete_unloads_from_engine(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    created = _upload(client, admin, loras["good"], kind="ke", lineage="ke:x").json()
    assert client.post(f"/admin/adapters/{created['id']}/load", json={"pin": True}, headers=admin).status_code == 200
    assert client.delete(f"/admin/adapters/{created['id']}", headers=admin).status_code == 204
    engine = client.get("/admin/engine", headers=admin).json()
    assert (engine["adapters"], engine["loaded_count"], engine["pinned_count"]) == ([], 0, 0)


# -- engine -------------------------------------------------------------------------------------------------------


def test_engine_load_pin_unload_round_trip(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    adapter_id = _km(client, admin, loras["good"], _document(client))["id"]
    before = client.get("/admin/engine", headers=admin).json()
    assert (before["engine"], before["base_model"], before["adapters"]) == ("hf", MODEL_NAME, [])
    loaded = client.post(f"/admin/adapters/{adapter_id}/load", headers=admin).json()
    assert (loaded["loaded"], loaded["pinned"], loaded["version"]) == (True, False, 1)
    pinned = client.post(f"/admin/adapters/{adapter_id}/pin", headers=admin).json()
    assert pinned["pinned"] is True
    engine = client.get("/admin/engine", headers=admin).json()
    assert [(a["id"], a["pinned"]) for a in engine["adapters"]] == [(adapter_id, True)]
    assert (engine["loaded_count"], engine["pinned_count"], engine["loads"]) == (1, 1, before["loads"] + 1)
    unpinned = client.post(f"/admin/adapters/{adapter_id}/pin", json={"pinned": False}, headers=admin).json()
    assert unpinned["pinned"] is False
    unloaded = client.post(f"/admin/adapters/{adapter_id}/unload", headers=admin).json()
    assert (unloaded["loaded"], unloaded["pinned"]) == (False, False)
    assert client.get("/admin/engine", headers=admin).json()["adapters"] == []


def test_unload_or_pin_of_not_loaded_adapter_is_404(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path]
) -> None:
    adapter_id = _km(client, admin, loras["good"], _document(client))["id"]
    for action in ("unload", "pin"):
        response = client.post(f"/admin/adapters/{adapter_id}/{action}", headers=admin)
        assert _error(response, 404, "adapter_not_loaded") == MSG_NOT_LOADED.format(adapter_id=adapter_id)


def test_load_with_pin_and_metrics_gauges(client: TestClient, admin: dict[str, str], loras: dict[str, Path]) -> None:
    adapter_id = _km(client, admin, loras["good"], _document(client))["id"]
    loaded = client.post(f"/admin/adapters/{adapter_id}/load", json={"pin": True}, headers=admin).json()
    assert (loaded["loaded"], loaded["pinned"]) == (True, True)
    engine = client.get("/admin/engine", headers=admin).json()
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    assert registry.get_sample_value("kmserve_adapters_loaded") == 1.0
    assert registry.get_sample_value("kmserve_adapter_loads") == float(engine["loads"])
    assert registry.get_sample_value("kmserve_adapter_cache_hit_rate") == engine["hit_rate"]


def test_failed_adapter_is_not_loaded(client: TestClient, admin: dict[str, str]) -> None:
    with transaction(_state(client).sessions) as session:
        adapter_id = make_adapter(session, status=AdapterStatus.FAILED).id
    response = client.post(f"/admin/adapters/{adapter_id}/load", headers=admin)
    assert _error(response, 409, "adapter_not_ready") == MSG_NOT_READY.format(adapter_id=adapter_id, status="failed")


def test_openapi_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/admin/adapters", "/admin/adapters/{adapter_id}", "/admin/engine",
            "/admin/adapters/{adapter_id}/pin"} <= set(paths)


# -- base model shapes ----------------------------------------------------------------------------------------


def test_base_module_shapes_reads_every_linear_layer(tiny_model_dir: Path) -> None:
    shapes = base_module_shapes(str(tiny_model_dir))
    assert shapes[Q_PROJ] == (64, 64)
    assert shapes["model.layers.1.mlp.down_proj"] == (176, 64)
    assert shapes["model.layers.1.mlp.gate_proj"] == (64, 176)
    assert len([p for p in shapes if p.startswith("model.layers.")]) == 2 * 7


def test_uploaded_km_answers_queries_that_report_its_version(
    client: TestClient, admin: dict[str, str], loras: dict[str, Path]
) -> None:
    document_id = _document(client)
    question = {"document_id": document_id, "question": "What is the capital of Varo?", "max_tokens": 6}
    first = _km(client, admin, loras["good"], document_id)
    answer = client.post("/v1/query", json=question, headers=admin)
    assert answer.status_code == 200, answer.text
    assert answer.json()["adapters"]["km"] == {"id": first["id"], "name": f"km:{document_id}", "version": 1}
    second = _km(client, admin, loras["good2"], document_id)
    again = client.post("/v1/query", json=question, headers=admin).json()
    assert again["adapters"]["km"] == {"id": second["id"], "name": f"km:{document_id}", "version": 2}
