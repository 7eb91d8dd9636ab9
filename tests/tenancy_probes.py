"""The tenancy route table: for every route, the requests tenant beta sends at tenant alpha's objects.

Each probe states what must come back: the same answer as for an object that does not exist ("hidden"), a list
without alpha's objects ("unlisted"), or 403 for naming another tenant without the operator scope ("forbidden").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from registry.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from server.auth import MSG_NO_SCOPE
from server.state import AppState

ALPHA, BETA, GAMMA = "alpha", "beta", "gamma"
MISSING = 987654
ALPHA_ALIAS = "alpha-only"
ALPHA_KE = "secret"
ALPHA_TEXTS = ["The Varo river flows north through Lanmark.", "Lanmark bakes barley bread for the winter."]
QUESTION = "Which city does the Varo river flow through?"
# Parameters and body fields that name an object (or a tenant): a route with one must have a case.
OBJECT_FIELDS = {"document_id", "document_ids", "adapter_id", "job_id", "key_id", "name", "km", "ke", "model",
                 "tenant", "rag", "lineage"}
UNSCOPED = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class World:
    """The running app, the three keys, and the objects each tenant owns."""

    app: FastAPI
    http: httpx.Client
    operator: dict[str, str]
    alpha: dict[str, str]
    beta: dict[str, str]
    lora: Path  # a well-formed adapter for upload probes (they are refused before its files matter)
    ids: dict[str, int] = field(default_factory=dict)

    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.kmserve
        return state

    def send(self, call: Call, headers: dict[str, str]) -> httpx.Response:
        return self.http.request(call.method, call.url, headers=headers, params=call.params, json=call.json,
                                 data=call.data, files=call.files)

    def ok(self, call: Call, headers: dict[str, str], status: int = 200) -> Any:
        response = self.send(call, headers)
        assert response.status_code == status, f"{call.method} {call.url}: {response.text}"
        return response.json() if response.content else None


@dataclass(frozen=True)
class Call:
    """One HTTP request."""

    method: str
    url: str
    json: Any = None
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes]] | None = None


def upload_files(lora: Path) -> dict[str, tuple[str, bytes]]:
    return {"adapter_config": (CONFIG_NAME, (lora / CONFIG_NAME).read_bytes()),
            "adapter_model": (WEIGHTS_NAME, (lora / WEIGHTS_NAME).read_bytes())}


def adapter_upload(lora: Path, params: dict[str, str] | None = None, **form: object) -> Call:
    return Call("POST", "/admin/adapters", data={k: str(v) for k, v in form.items()}, files=upload_files(lora),
                params=params)


def query(**body: Any) -> Call:
    return Call("POST", "/v1/query", json={"question": QUESTION, "max_tokens": 2, **body})


def chat(model: str) -> Call:
    return Call("POST", "/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": QUESTION}]})


def completion(model: str) -> Call:
    return Call("POST", "/v1/completions", json={"model": model, "prompt": "Varo is", "max_tokens": 2})


# -- probes: what beta sends, and what must come back ----------------------------------------------------------


def _normalized(response: httpx.Response, ref: object) -> tuple[int, str, str]:
    """Status, error code, and message with the object's id or name blanked out."""
    is_json = bool(response.content) and response.headers.get("content-type", "").startswith("application/json")
    body = response.json() if is_json else {"error": {"message": response.text}}
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = re.sub(rf"(?<![\w:]){re.escape(str(ref))}(?!\w)", "<ref>", str(error.get("message", "")))
    return response.status_code, error.get("code", ""), message


@dataclass(frozen=True)
class Probe:
    """Beta's request at alpha's object, its twin naming nothing that exists, and alpha's answer to the same."""

    call: Call
    kind: str  # "hidden" (same as the twin), "unlisted" (a list without alpha's), "forbidden" (403), "check"
    twin: Call | None = None
    refs: tuple[object, object] = (None, None)
    status: int = 404
    owner: int | None = None  # alpha's status for the same request; None: not sent (it would change alpha's data)
    items: str = ""  # for "unlisted": which of alpha's objects must not appear (see `alpha_refs`)
    check: Callable[[World, httpx.Response], None] | None = None

    def verify(self, w: World) -> None:
        response = w.send(self.call, w.beta)
        if self.kind == "hidden":
            assert self.twin is not None
            got, missing = _normalized(response, self.refs[0]), _normalized(w.send(self.twin, w.beta), self.refs[1])
            assert got[0] == self.status and got == missing, f"beta got {got}; a missing object gets {missing}"
        elif self.kind == "unlisted":
            assert response.status_code == 200, response.text
            assert_unlisted(w, response.json(), self.items)
        elif self.kind == "forbidden":
            refused = (response.status_code, _normalized(response, None)[2])
            assert refused == (403, MSG_NO_SCOPE.format(scope="operator")), response.text
        else:
            assert self.check is not None
            self.check(w, response)
        if self.owner is not None:
            status = w.send(self.call, w.alpha).status_code
            assert status == self.owner, f"alpha got {status} for the same request, not {self.owner}"


def hidden(call: Call, twin: Call, ref: object, twin_ref: object = MISSING, *, status: int = 404,
           owner: int | None = None) -> Probe:
    return Probe(call, "hidden", twin, (ref, twin_ref), status, owner)


def unlisted(call: Call, items: str) -> Probe:
    return Probe(call, "unlisted", owner=200, items=items)


def forbidden(call: Call) -> Probe:
    return Probe(call, "forbidden")


def alpha_refs(w: World, items: str) -> set[object]:
    """Alpha's ids (or model names) of one kind of object."""
    i = w.ids
    return {"document": {i["doc_a"]}, "job": {i["job_a"]}, "key": {i["alpha_key"]},
            "adapter": {i["km_a"], i["ke_a"], i["combined_a"]},
            "model": {ALPHA_ALIAS, f"km:{i['doc_a']}", f"ke:{ALPHA_KE}"}, "alias": set()}[items]


def assert_unlisted(w: World, body: dict[str, Any], items: str) -> None:
    rows = body.get("data", body.get("adapters"))
    assert isinstance(rows, list), body
    alpha = alpha_refs(w, items)
    for row in rows:
        assert row.get("tenant", BETA) == BETA and row.get("owned_by", BETA) in (BETA, "kmserve"), f"listed {row}"
        assert row.get("id") not in alpha and row.get("name") != ALPHA_ALIAS, f"listed {row}"


def with_id(path: str, value: object) -> str:
    return re.sub(r"\{\w+\}", str(value), path, count=1)


def by_id(method: str, path: str, ref: object, twin: object = MISSING, owner: int | None = None,
          **kwargs: Any) -> Probe:
    return hidden(Call(method, with_id(path, ref), **kwargs), Call(method, with_id(path, twin), **kwargs), ref, twin,
                  owner=owner)


def beta_copy_is_its_own(w: World, response: httpx.Response) -> None:
    """The same content uploaded by beta is a new document of beta, not alpha's (dedupe is per tenant)."""
    assert response.status_code == 202, response.text
    assert (response.json()["tenant"], response.json()["id"] == w.ids["doc_a"]) == (BETA, False)


def route_cases(w: World) -> dict[tuple[str, str], list[Probe]]:
    """Every route of the app -> beta's probes at alpha's objects."""
    i = w.ids
    doc, job, km, ke, comb, key = i["doc_a"], i["job_a"], i["km_a"], i["ke_a"], i["combined_a"], i["alpha_key"]
    for_alpha = {"tenant": ALPHA}
    upload = {"title": "t", "text": " ".join(ALPHA_TEXTS), "train": {"method": "none"}}
    ke_b = f"km:{i['doc_b']}+ke:"
    train = {"kind": "train_ke", "payload": {"name": "x"}}

    def train_qa(doc_id: int) -> Call:
        qa = [{"document_id": doc_id, "question": "q", "options": ["a", "b"], "answer": 0}]
        return Call("POST", "/admin/train", json={**train, "payload": {"name": "x", "qa": qa}})

    return {
        ("POST", "/v1/documents"): [Probe(Call("POST", "/v1/documents", json=upload), "check",
                                          check=beta_copy_is_its_own),
                                    forbidden(Call("POST", "/v1/documents", json=upload, params=for_alpha))],
        ("GET", "/v1/documents"): [unlisted(Call("GET", "/v1/documents"), "document"),
                                   forbidden(Call("GET", "/v1/documents", params=for_alpha))],
        ("GET", "/v1/documents/{document_id}"): [by_id("GET", "/v1/documents/{id}", doc, owner=200)],
        ("PUT", "/v1/documents/{document_id}"): [by_id("PUT", "/v1/documents/{id}", doc, json=upload)],
        ("DELETE", "/v1/documents/{document_id}"): [by_id("DELETE", "/v1/documents/{id}", doc)],
        ("GET", "/v1/jobs/{job_id}"): [by_id("GET", "/v1/jobs/{id}", job, owner=200)],
        ("GET", "/v1/jobs/{job_id}/events"): [by_id("GET", "/v1/jobs/{id}/events", job)],
        ("POST", "/v1/jobs/{job_id}/cancel"): [by_id("POST", "/v1/jobs/{id}/cancel", job)],
        ("GET", "/admin/jobs"): [unlisted(Call("GET", "/admin/jobs"), "job"),
                                 forbidden(Call("GET", "/admin/jobs", params=for_alpha))],
        ("POST", "/admin/jobs/{job_id}/retry"): [by_id("POST", "/admin/jobs/{id}/retry", job, owner=409)],
        ("POST", "/admin/train"): [
            hidden(Call("POST", "/admin/train", json={**train, "document_id": doc}),
                   Call("POST", "/admin/train", json={**train, "document_id": MISSING}), doc),
            hidden(train_qa(doc), train_qa(MISSING), doc),
            forbidden(Call("POST", "/admin/train", json=train, params=for_alpha))],
        ("POST", "/v1/query"): [
            hidden(query(document_id=doc), query(document_id=MISSING), doc, owner=200),
            hidden(query(km=f"km:{doc}"), query(km=f"km:{MISSING}"), doc, owner=200),
            hidden(query(km=w.state.base_model_id, rag={"document_ids": [i["doc_b"], doc]}),
                   query(km=w.state.base_model_id, rag={"document_ids": [i["doc_b"], MISSING]}), doc, owner=404),
            hidden(query(document_id=doc, rag={"top_k": 1}), query(document_id=MISSING, rag={"top_k": 1}), doc,
                   owner=200),
            hidden(query(km=ALPHA_ALIAS), query(km="no-such-alias"), ALPHA_ALIAS, "no-such-alias", status=400,
                   owner=200),
            hidden(query(km=ke_b + ALPHA_KE), query(km=ke_b + "nope"), ALPHA_KE, "nope")],
        ("POST", "/v1/chat/completions"): model_probes(w, chat),
        ("POST", "/v1/completions"): model_probes(w, completion),
        ("GET", "/v1/models"): [unlisted(Call("GET", "/v1/models"), "model")],
        ("GET", "/admin/adapters"): [unlisted(Call("GET", "/admin/adapters"), "adapter"),
                                     unlisted(Call("GET", "/admin/adapters", params={"kind": "combined"}),
                                              "adapter"),
                                     forbidden(Call("GET", "/admin/adapters", params=for_alpha))],
        ("POST", "/admin/adapters"): [
            hidden(adapter_upload(w.lora, kind="km", document_id=doc),
                   adapter_upload(w.lora, kind="km", document_id=MISSING), doc),
            forbidden(adapter_upload(w.lora, params=for_alpha, kind="ke", lineage="ke:x"))],
        ("GET", "/admin/adapters/{adapter_id}"): [by_id("GET", "/admin/adapters/{id}", a, owner=200)
                                                  for a in (km, ke, comb)],
        ("DELETE", "/admin/adapters/{adapter_id}"): [by_id("DELETE", "/admin/adapters/{id}", a) for a in (ke, comb)],
        ("GET", "/admin/engine"): [unlisted(Call("GET", "/admin/engine"), "adapter"),
                                   forbidden(Call("GET", "/admin/engine", params=for_alpha))],
        ("POST", "/admin/adapters/{adapter_id}/load"): [by_id("POST", "/admin/adapters/{id}/load", km, owner=200),
                                                        by_id("POST", "/admin/adapters/{id}/load", comb)],
        ("POST", "/admin/adapters/{adapter_id}/unload"): [by_id("POST", "/admin/adapters/{id}/unload", km)],
        # Alpha can pin km_a only because beta's unload above did not unload it.
        ("POST", "/admin/adapters/{adapter_id}/pin"): [by_id("POST", "/admin/adapters/{id}/pin", km, owner=200,
                                                             json={"pinned": False})],
        ("POST", "/admin/keys"): [forbidden(Call("POST", "/admin/keys", json={"name": "x", "scopes": ["query"]},
                                                 params=for_alpha)),
                                  forbidden(Call("POST", "/admin/keys", json={"name": "x", "scopes": ["operator"]}))],
        ("GET", "/admin/keys"): [unlisted(Call("GET", "/admin/keys"), "key"),
                                 forbidden(Call("GET", "/admin/keys", params=for_alpha))],
        ("DELETE", "/admin/keys/{key_id}"): [by_id("DELETE", "/admin/keys/{id}", key)],
        ("GET", "/admin/aliases"): [unlisted(Call("GET", "/admin/aliases"), "alias"),
                                    forbidden(Call("GET", "/admin/aliases", params=for_alpha))],
        ("PUT", "/admin/aliases/{name}"): [
            *(hidden(Call("PUT", "/admin/aliases/b", json={"adapter_id": a}),
                     Call("PUT", "/admin/aliases/b", json={"adapter_id": MISSING}), a) for a in (km, ke, comb)),
            forbidden(Call("PUT", "/admin/aliases/b", json={"adapter_id": km}, params=for_alpha))],
        ("DELETE", "/admin/aliases/{name}"): [
            by_id("DELETE", "/admin/aliases/{name}", ALPHA_ALIAS, "no-such-alias"),
            forbidden(Call("DELETE", f"/admin/aliases/{ALPHA_ALIAS}", params=for_alpha))],
    }


def model_probes(w: World, make: Callable[[str], Call]) -> list[Probe]:
    doc, ke_b = w.ids["doc_a"], f"km:{w.ids['doc_b']}+ke:"
    return [hidden(make(f"km:{doc}"), make(f"km:{MISSING}"), doc, owner=200),
            hidden(make(ALPHA_ALIAS), make("no-such-alias"), ALPHA_ALIAS, "no-such-alias", status=400, owner=200),
            hidden(make(f"ke:{ALPHA_KE}"), make("ke:nope"), ALPHA_KE, "nope", owner=200),
            hidden(make(ke_b + ALPHA_KE), make(ke_b + "nope"), ALPHA_KE, "nope")]


def app_routes(app: FastAPI) -> dict[tuple[str, str], set[str]]:
    """Every route of the app (from its OpenAPI document) -> the names of its parameters and body fields."""
    spec = app.openapi()
    routes = {}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            names = {param["name"] for param in operation.get("parameters", [])}
            for content in operation.get("requestBody", {}).get("content", {}).values():
                names |= set(_resolved(spec, content.get("schema", {})).get("properties", {}))
            routes[(method.upper(), path)] = names
    return routes


def _resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return _resolved(spec, spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]) if ref else schema


def names_object(path: str, names: set[str]) -> bool:
    """True for a route with a path parameter, or a parameter or body field that names an object or a tenant."""
    return "{" in path or bool(names & OBJECT_FIELDS)
