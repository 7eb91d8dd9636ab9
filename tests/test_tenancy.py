"""Tenant isolation, route by route, on a real server on loopback (SQLite and PostgreSQL).

Tenant beta's admin key is sent at tenant alpha's documents, jobs, adapters (KM, KE, combined), aliases and keys on
every route of the app: each answer is exactly the answer for an object that does not exist (404 not_found; an alias
name as a model is the same 400 as an unknown name), and lists leave alpha's objects out. Alpha still sees all of
them afterwards. The operator key written at first start reaches both tenants.

`route_cases` (tests/tenancy_probes.py) must name every route of the app: a new route fails
`test_every_route_has_a_tenancy_case` until it gets a case there (routes that name no object and read no tenant's
data are listed in `UNSCOPED`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engines.indexing import index_document
from registry.adapters import get_adapter
from registry.config import Settings
from registry.db import transaction
from registry.errors import NotFoundError
from server.app import create_app
from server.auth import MSG_NO_SCOPE
from server.services.resolver import AdapterRef
from tests.conftest import drop_postgres_schema, new_postgres_schema_url
from tests.live_server import serve
from tests.tenancy_probes import (
    ALPHA,
    ALPHA_ALIAS,
    ALPHA_KE,
    ALPHA_TEXTS,
    BETA,
    GAMMA,
    QUESTION,
    UNSCOPED,
    Call,
    World,
    adapter_upload,
    app_routes,
    bearer,
    names_object,
    query,
    route_cases,
)
from tests.tiny import save_lora_for
from trainer_worker.artifacts import Chunk


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("tenancy-loras")
    return [save_lora_for(tiny_model_dir, root / f"l{i}", seed=40 + i) for i in range(3)]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    url, schema = new_postgres_schema_url()
    yield url
    drop_postgres_schema(schema)


@pytest.fixture(scope="module")
def world(database_url: str | None, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
          loras: list[Path]) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("tenancy") / "data", base_model=str(tiny_model_dir),
                        model_name="kmserve-tiny", database_url=database_url)
    app = create_app(settings)
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        operator = bearer(settings.admin_key_file.read_text().strip())
        keys = [http.post("/admin/keys", params={"tenant": tenant}, json={"name": tenant, "scopes": ["admin"]},
                          headers=operator).json() for tenant in (ALPHA, BETA, ALPHA)]
        world = World(app, http, operator, bearer(keys[0]["key"]), bearer(keys[1]["key"]), loras[2])
        world.ids["alpha_key"] = keys[2]["id"]
        populate(world, loras)
        yield world


def populate(w: World, loras: list[Path]) -> None:
    """Alpha: a document (indexed), its KM, a KE, their combined adapter, an alias, a job. Beta: a document, a KM."""
    text = " ".join(ALPHA_TEXTS)
    doc = w.ok(Call("POST", "/v1/documents", json={"title": "a", "text": text, "train": {"method": "none"}}),
               w.alpha, 202)
    w.ids |= {"doc_a": doc["id"], "job_a": doc["jobs"][0]["id"]}
    w.ids["doc_b"] = w.ok(Call("POST", "/v1/documents", json={"title": "b", "text": "beta's own notes"}), w.beta,
                          202)["id"]
    w.ids["km_a"] = w.ok(adapter_upload(loras[0], kind="km", document_id=w.ids["doc_a"]), w.alpha, 201)["id"]
    w.ids["ke_a"] = w.ok(adapter_upload(loras[1], kind="ke", lineage=f"ke:{ALPHA_KE}"), w.alpha, 201)["id"]
    w.ids["km_b"] = w.ok(adapter_upload(loras[2], kind="km", document_id=w.ids["doc_b"]), w.beta, 201)["id"]
    w.ok(Call("PUT", f"/admin/aliases/{ALPHA_ALIAS}", json={"adapter_id": w.ids["km_a"]}), w.alpha)
    w.ok(query(document_id=w.ids["doc_a"], ke=ALPHA_KE), w.alpha)
    combined = w.ok(Call("GET", "/admin/adapters", params={"kind": "combined"}), w.alpha)["data"]
    w.ids["combined_a"] = combined[0]["id"]
    chunks = [Chunk(i, t, 50 * i, 50 * i + 50) for i, t in enumerate(ALPHA_TEXTS)]
    index_document(w.state.settings, ALPHA, w.ids["doc_a"], chunks)


# -- tests ------------------------------------------------------------------------------------------------------


def test_every_route_has_a_tenancy_case(world: World) -> None:
    routes = app_routes(world.app)
    cases = route_cases(world)
    assert sorted(set(routes) - set(cases) - UNSCOPED) == []
    assert sorted(set(cases) - set(routes)) == []
    assert [key for key in UNSCOPED if names_object(key[1], routes[key])] == []
    # The detector sees what it must: a path parameter, a body field, a form field, a query filter.
    assert all(names_object(path, routes[(method, path)]) for method, path in [
        ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/query"), ("POST", "/admin/adapters"), ("GET", "/v1/documents")])


def test_beta_finds_none_of_alphas_objects_on_any_route(world: World) -> None:
    failures = []
    for (method, path), probes in route_cases(world).items():
        for number, probe in enumerate(probes):
            try:
                probe.verify(world)
            except AssertionError as exc:
                failures.append(f"{method} {path} probe {number}: {exc}")
    assert not failures, "\n".join(failures)


def test_alpha_still_has_everything(world: World) -> None:
    w, i = world, world.ids
    assert w.ok(Call("GET", f"/v1/documents/{i['doc_a']}"), w.alpha)["revision"] == 1
    assert w.ok(Call("GET", f"/v1/jobs/{i['job_a']}"), w.alpha)["status"] == "queued"
    for adapter in ("km_a", "ke_a", "combined_a"):
        assert w.ok(Call("GET", f"/admin/adapters/{i[adapter]}"), w.alpha)["tenant"] == ALPHA
    aliases = {a["name"]: a["adapter_id"] for a in w.ok(Call("GET", "/admin/aliases"), w.alpha)["data"]}
    assert aliases[ALPHA_ALIAS] == i["km_a"] and "b" not in aliases
    assert i["alpha_key"] in [k["id"] for k in w.ok(Call("GET", "/admin/keys"), w.alpha)["data"]]
    models = [m["id"] for m in w.ok(Call("GET", "/v1/models"), w.alpha)["data"]]
    assert {ALPHA_ALIAS, f"km:{i['doc_a']}"} <= set(models)
    passages = w.ok(query(document_id=i["doc_a"], rag={"top_k": 2}), w.alpha)["passages"]
    assert {p["document_id"] for p in passages} == {i["doc_a"]}
    resident = {a["id"] for a in w.ok(Call("GET", "/admin/engine"), w.alpha)["adapters"]}
    assert {i["km_a"], i["combined_a"]} <= resident


def test_vector_search_is_scoped_by_tenant_and_document(world: World) -> None:
    (vector,) = world.state.require_embedder().embed([QUESTION])
    index = world.state.require_vector_index()
    assert {p.document_id for p in index.search(ALPHA, [world.ids["doc_a"]], vector, 5)} == {world.ids["doc_a"]}
    assert index.search(BETA, [world.ids["doc_a"]], vector, 5) == []
    assert index.search(ALPHA, [world.ids["doc_b"]], vector, 5) == []


def test_a_ke_of_another_tenant_is_never_combined(world: World) -> None:
    with transaction(world.state.sessions) as session:
        km_b, ke_a = (AdapterRef.of(get_adapter(session, world.ids[k], tenant=None)) for k in ("km_b", "ke_a"))
    with pytest.raises(NotFoundError):
        asyncio.run(world.app.state.adapter_service.combined(km_b, ke_a))


def test_bootstrap_key_is_the_operator(world: World) -> None:
    keys = world.ok(Call("GET", "/admin/keys", params={"tenant": "default"}), world.operator)["data"]
    assert (keys[0]["name"], keys[0]["scopes"]) == ("admin (first start)", ["operator"])


def test_operator_sees_every_tenant_and_filters_by_tenant(world: World) -> None:
    w, i = world, world.ids
    lists = {"/v1/documents": ("doc_a", "doc_b"), "/admin/adapters": ("km_a", "km_b"), "/admin/aliases": None,
             "/admin/jobs": ("job_a", None), "/admin/keys": None}
    for path, pair in lists.items():
        rows = w.ok(Call("GET", path), w.operator)["data"]
        assert {ALPHA, BETA} <= {r["tenant"] for r in rows}, path
        only = w.ok(Call("GET", path, params={"tenant": ALPHA}), w.operator)["data"]
        assert only and {r["tenant"] for r in only} == {ALPHA}, path
        if pair is not None:
            assert i[pair[0]] in [r["id"] for r in only], path
    for path in (f"/v1/documents/{i['doc_a']}", f"/v1/jobs/{i['job_a']}", f"/admin/adapters/{i['combined_a']}"):
        assert w.ok(Call("GET", path), w.operator)["tenant"] == ALPHA


def test_operator_acts_in_the_tenant_it_names(world: World) -> None:
    w, km = world, world.ids["km_a"]
    put = Call("PUT", "/admin/aliases/by-operator", json={"adapter_id": km}, params={"tenant": ALPHA})
    assert w.ok(put, w.operator)["tenant"] == ALPHA
    assert "by-operator" in [a["name"] for a in w.ok(Call("GET", "/admin/aliases"), w.alpha)["data"]]
    own_tenant = w.send(Call("PUT", "/admin/aliases/by-operator", json={"adapter_id": km}), w.operator)
    assert own_tenant.status_code == 404  # names live in one tenant: alpha's adapter is not the default tenant's
    created = w.ok(Call("POST", "/admin/keys", json={"name": "g", "scopes": ["query"]}, params={"tenant": GAMMA}),
                   w.operator, 201)
    assert created["tenant"] == GAMMA
    assert w.ok(Call("GET", "/v1/documents"), bearer(created["key"]))["data"] == []


def test_only_an_operator_hands_out_operator_or_foreign_keys(world: World) -> None:
    w = world
    operator_key = {"name": "op", "scopes": ["operator"]}
    refused = w.send(Call("POST", "/admin/keys", json=operator_key), w.alpha)
    assert refused.status_code == 403
    assert refused.json()["error"] == {"code": "forbidden", "message": MSG_NO_SCOPE.format(scope="operator")}
    assert w.send(Call("POST", "/admin/keys", json={"name": "x", "scopes": ["admin"]}, params={"tenant": BETA}),
                  w.alpha).status_code == 403
    second = w.ok(Call("POST", "/admin/keys", json=operator_key), w.operator, 201)
    assert w.ok(Call("GET", f"/v1/documents/{w.ids['doc_b']}"), bearer(second["key"]))["tenant"] == BETA
    default_admin = w.ok(Call("POST", "/admin/keys", json={"name": "d", "scopes": ["admin"]}), w.operator, 201)
    revoke = w.send(Call("DELETE", f"/admin/keys/{second['id']}"), bearer(default_admin["key"]))
    assert revoke.status_code == 403
    assert w.ok(Call("DELETE", f"/admin/keys/{second['id']}"), w.operator)["revoked_at"] is not None
