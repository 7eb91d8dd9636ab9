"""Auth scopes and the admin key/alias routes, through the real app (ASGI)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from registry.config import Settings
from registry.db import transaction
from server.app import create_app
from server.auth import MSG_NO_KEY, MSG_NO_SCOPE
from tests.factories import make_adapter, make_stored_adapter


@pytest.fixture
def settings(app_settings: Settings) -> Settings:
    return app_settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def admin(settings: Settings, client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_key_file.read_text().strip()}"}


def _key(client: TestClient, admin: dict[str, str], *scopes: str) -> dict[str, str]:
    response = client.post("/admin/keys", json={"name": "k", "scopes": list(scopes)}, headers=admin)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


def test_missing_key_is_401_json(client: TestClient) -> None:
    response = client.get("/admin/keys")
    assert response.status_code == 401
    assert response.json() == {"error": {"code": "unauthorized", "message": MSG_NO_KEY}}


def test_invalid_key_is_401(client: TestClient) -> None:
    assert client.get("/admin/keys", headers={"Authorization": "Bearer kms_wrong"}).status_code == 401


def test_x_api_key_header_accepted(client: TestClient, settings: Settings) -> None:
    key = settings.admin_key_file.read_text().strip()
    assert client.get("/admin/keys", headers={"X-API-Key": key}).status_code == 200


def test_query_key_refused_on_admin_routes(client: TestClient, admin: dict[str, str]) -> None:
    query = _key(client, admin, "query")
    response = client.get("/admin/aliases", headers=query)
    assert response.status_code == 403
    assert response.json()["error"]["message"] == MSG_NO_SCOPE.format(scope="admin")


def test_key_lifecycle_and_secret_shown_once(client: TestClient, admin: dict[str, str]) -> None:
    created = client.post("/admin/keys", json={"name": "ops", "scopes": ["admin"]}, headers=admin).json()
    listed = client.get("/admin/keys", headers=admin).json()
    assert created["key"].startswith(created["prefix"])
    assert all("key" not in k for k in listed["data"])
    assert created["id"] in [k["id"] for k in listed["data"]]
    new_admin = {"Authorization": f"Bearer {created['key']}"}
    assert client.get("/admin/keys", headers=new_admin).status_code == 200
    assert client.delete(f"/admin/keys/{created['id']}", headers=admin).status_code == 200
    assert client.get("/admin/keys", headers=new_admin).status_code == 401


def test_bad_scope_is_422(client: TestClient, admin: dict[str, str]) -> None:
    response = client.post("/admin/keys", json={"name": "x", "scopes": ["root"]}, headers=admin)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_alias_hot_swap_routes(client: TestClient, admin: dict[str, str]) -> None:
    state = client.app.state.kmserve  # type: ignore[attr-defined]
    with transaction(state.sessions) as session:
        v1 = make_stored_adapter(session, state.store, seed=1)
        v2 = make_stored_adapter(session, state.store, seed=2, lineage=v1.lineage, document_id=v1.document_id)
        unstored = make_adapter(session, lineage=v1.lineage, document_id=v1.document_id)
    put = client.put(f"/admin/aliases/{v1.lineage}", json={"adapter_id": v1.id}, headers=admin).json()
    assert (put["version"], put["revision"]) == (1, 1)
    moved = client.put(f"/admin/aliases/{v1.lineage}", json={"adapter_id": v2.id}, headers=admin).json()
    assert (moved["version"], moved["revision"]) == (2, 2)
    lost = client.put(f"/admin/aliases/{v1.lineage}", json={"adapter_id": unstored.id}, headers=admin)
    assert lost.status_code == 404 and lost.json()["error"]["code"] == "not_found"  # a version whose files are gone
    listed = client.get("/admin/aliases", headers=admin).json()["data"]
    assert [a["adapter_id"] for a in listed] == [v2.id]
    assert v1.lineage in [a["name"] for a in listed]
    assert client.delete(f"/admin/aliases/{v1.lineage}", headers=admin).status_code == 204
    missing = client.delete(f"/admin/aliases/{v1.lineage}", headers=admin)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_alias_to_missing_adapter_404(client: TestClient, admin: dict[str, str]) -> None:
    response = client.put("/admin/aliases/x", json={"adapter_id": 424242}, headers=admin)
    assert response.status_code == 404


def test_auth_off_allows_admin(app_settings: Settings) -> None:
    with TestClient(create_app(app_settings.model_copy(update={"auth": "off"}))) as test_client:
        assert test_client.get("/admin/keys").status_code == 200
