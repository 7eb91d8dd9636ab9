"""Hostile requests against every route of a live loopback server, with a valid admin key, on SQLite and PostgreSQL.

Schemathesis generates valid and invalid requests for every operation in /openapi.json; each response must be
below 500, and every 4xx must carry the API's error shape {"error": {"code": snake_case, "message": str}}.
Hand-written requests then cover what a schema cannot express: malformed or non-UTF-8 JSON, wrong content
types, unknown routes and methods, NaN and Infinity, integers past 64 bits, NUL characters and lone surrogates.
The two databases refuse different values (SQLite: integers past 2^63; PostgreSQL: NUL and NaN), so both run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from sqlalchemy import select

from registry.api_keys import create_api_key
from registry.config import Settings
from registry.db import write_transaction
from registry.models import Job, JobStatus
from server.app import create_app
from server.errors import MSG_UNSTORABLE
from server.schemas.common import DB_INT_MAX, MSG_NOT_FINITE, MSG_NUL, MSG_SURROGATE, MSG_TOO_DEEP
from server.state import AppState
from tests.conftest import drop_postgres_schema, new_postgres_schema_url
from tests.live_server import serve
from tests.tiny import save_lora_for

# Examples per operation: the whole module (both databases) stays well under three minutes on two cores.
EXAMPLES = 20
GENERATION_EXAMPLES = 6
GENERATION_PATHS = frozenset({"/v1/query", "/v1/chat/completions", "/v1/completions"})
MAX_TOKENS = 4
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
# Generous: two shared CPU cores may be busy; a request past this is reported as a hang.
REQUEST_TIMEOUT = 30.0
# Failures kept per operation: enough to see the pattern, few enough to read.
FAILURES_PER_OPERATION = 3
CODE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
BIG = 10**30
TEXT = "The capital of Varo is Lumen. Lumen lies on the river Sel."


@dataclass
class Live:
    """A running server: its URL, its state, and the headers of an admin key."""

    url: str
    state: AppState
    headers: dict[str, str]

    def admin_headers(self) -> dict[str, str]:
        """The headers of a new admin key (a fuzzed DELETE /admin/keys/{id} may revoke an earlier one)."""
        with write_transaction(self.state.sessions) as session:
            _, plaintext = create_api_key(session, "fuzz", ["admin"])
        return {"Authorization": f"Bearer {plaintext}"}


def error_problem(status: int, body: bytes) -> str | None:
    """What is wrong with a response: a 5xx, or a 4xx whose body is not the API's error shape; None if fine."""
    if status >= 500:
        return f"status {status}: {body[:300]!r}"
    if status < 400:
        return None
    try:
        error = json.loads(body)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return f"status {status} without the error shape: {body[:300]!r}"
    if not (isinstance(code, str) and CODE.match(code) and isinstance(message, str) and message):
        return f"status {status} with code {code!r} / message {message!r}"
    return None


def small_generation(schema: Any) -> Any:
    """The OpenAPI document with max_tokens required and at most MAX_TOKENS, so generation stays fast."""
    if isinstance(schema, list):
        return [small_generation(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: small_generation(value) for key, value in schema.items()}
    properties = out.get("properties")
    if isinstance(properties, dict) and "max_tokens" in properties:
        for name in TOKEN_FIELDS:
            if name in properties:
                properties[name] = _capped(properties[name])
        out["required"] = sorted({*out.get("required", []), "max_tokens"})
    return out


def _capped(node: Any) -> Any:
    if isinstance(node, dict):
        capped = {key: _capped(value) for key, value in node.items()}
        if capped.get("type") == "integer":
            capped["maximum"] = MAX_TOKENS
        return capped
    if isinstance(node, list):
        return [_capped(item) for item in node]
    return node


def end_live_jobs(state: AppState) -> None:
    """Cancel queued jobs (no worker runs here), so that a fuzzed event stream ends instead of waiting."""
    with state.sessions() as session:
        live = list(session.scalars(select(Job.id).where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))))
    for job_id in sorted(live, reverse=True):
        state.queue.cancel(job_id)


def _seed(url: str, headers: dict[str, str], lora: Path) -> None:
    """A document and its uploaded KM (alias km:1), so that ids 1 and km:1 reach real rows and the engine."""
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        document = client.post("/v1/documents", json={"title": "Varo", "text": TEXT, "train": {"method": "none"}})
        assert document.status_code == 202, document.text
        files = {"adapter_config": ("adapter_config.json", (lora / "adapter_config.json").read_bytes()),
                 "adapter_model": ("adapter_model.safetensors", (lora / "adapter_model.safetensors").read_bytes())}
        form = {"kind": "km", "document_id": str(document.json()["id"])}
        uploaded = client.post("/admin/adapters", data=form, files=files)
        assert uploaded.status_code == 201, uploaded.text
        # Loads the embedder now rather than inside the first fuzzed RAG query.
        warm = client.post("/v1/query", json={"document_id": document.json()["id"], "question": "Where is Lumen?",
                                              "rag": {"top_k": 1}, "max_tokens": 1})
        assert warm.status_code == 200, warm.text


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
         ) -> Iterator[Live]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    database = new_postgres_schema_url() if request.param == "postgres" else None
    settings = Settings(data_dir=root / "data", base_model=str(tiny_model_dir), model_name="kmserve-tiny",
                        max_request_tokens=MAX_TOKENS, database_url=database[0] if database else None)
    app = create_app(settings)
    try:
        with serve(app) as url:
            state: AppState = app.state.kmserve
            headers = {"Authorization": f"Bearer {settings.admin_key_file.read_text().strip()}"}
            _seed(url, headers, save_lora_for(tiny_model_dir, root / "lora", seed=1))
            yield Live(url, state, headers)
    finally:
        if database:
            drop_postgres_schema(database[1])


# -- schemathesis over every operation ---------------------------------------------------------------------------


def fuzz_operation(live: Live, operation: Any, examples: int) -> list[str]:
    """Run `examples` valid and invalid cases of one operation; the problems found (without stopping at one)."""
    problems: list[str] = []
    headers = live.admin_headers()
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        try:
            response = case.call(base_url=live.url, headers=headers, timeout=REQUEST_TIMEOUT)
            problem = error_problem(response.status_code, response.content)
        except requests.RequestException as exc:  # a hang or a dropped connection is a finding, not a crash
            problem = f"no response: {type(exc).__name__}: {exc}"
        if problem and len(problems) < FAILURES_PER_OPERATION:
            problems.append(f"{operation.label}: {problem}\n    {case.as_curl_command(headers=headers)}")

    run()
    return problems


def test_schemathesis_every_operation_answers_without_5xx_in_the_error_shape(live: Live) -> None:
    raw = httpx.get(f"{live.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(small_generation(raw))
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results) >= 30  # every route of the API parsed, not a subset
    problems: list[str] = []
    for operation in operations:
        end_live_jobs(live.state)
        examples = GENERATION_EXAMPLES if operation.path in GENERATION_PATHS else EXAMPLES
        problems += fuzz_operation(live, operation, examples)
    assert not problems, "\n".join(problems)


def test_schema_caps_generation_max_tokens() -> None:
    capped = small_generation({"properties": {"max_tokens": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                                              "max_completion_tokens": {"type": "integer"}}, "required": ["model"]})
    assert capped == {"properties": {"max_tokens": {"anyOf": [{"type": "integer", "maximum": MAX_TOKENS},
                                                              {"type": "null"}]},
                                     "max_completion_tokens": {"type": "integer", "maximum": MAX_TOKENS}},
                      "required": ["max_tokens", "model"]}


@pytest.mark.parametrize(("status", "body", "expected"), [
    (200, b"{}", None),
    (404, b'{"error": {"code": "not_found", "message": "no such thing"}}', None),
    (500, b'{"error": {"code": "internal_error", "message": "boom"}}', "status 500"),
    (422, b'{"detail": [{"msg": "field required"}]}', "without the error shape"),
    (405, b"Method Not Allowed", "without the error shape"),
    (400, b'{"error": {"code": "BadRequest", "message": "x"}}', "with code 'BadRequest'"),
    (409, b'{"error": {"code": "conflict", "message": ""}}', "with code 'conflict'"),
])
def test_error_problem_flags_5xx_and_wrong_shapes(status: int, body: bytes, expected: str | None) -> None:
    problem = error_problem(status, body)
    assert problem is None if expected is None else (problem is not None and expected in problem)


# -- requests a schema cannot express -----------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
CHAT = {"model": "kmserve-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def raw(live: Live, method: str, path: str, content: bytes | str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {**live.admin_headers(), **kwargs.pop("headers", {})}
    return httpx.request(method, f"{live.url}{path}", content=content, headers=headers, timeout=REQUEST_TIMEOUT,
                         **kwargs)


def assert_error(response: httpx.Response, status: int, code: str, message_part: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert error_problem(response.status_code, response.content) is None, response.text
    error = response.json()["error"]
    assert error["code"] == code, response.text
    if message_part is not None:
        assert message_part in error["message"], response.text


@pytest.mark.parametrize(("method", "path", "content", "headers", "status", "code"), [
    pytest.param("POST", "/v1/query", b'{"km": "kmserve-tiny", "question":', JSON, 422, "validation_error",
                 id="truncated-json"),
    pytest.param("POST", "/admin/train", b'{"kind": "train_ke", "payload": {"x": "\xff"}}', JSON, 400, "bad_request",
                 id="json-not-utf8"),
    pytest.param("POST", "/v1/documents", b'{"title": "\xff", "text": "x"}', JSON, 422, "validation_error",
                 id="document-json-not-utf8"),
    pytest.param("POST", "/v1/query", b"[" * 100_000, JSON, 400, "bad_request", id="json-nested-100k"),
    pytest.param("POST", "/v1/documents", b'{"title": "t", "text": "x", "metadata": ' + b"[" * 5000 + b"]" * 5000
                 + b"}", JSON, 422, "validation_error", id="metadata-nested-5k"),
    pytest.param("POST", "/v1/query", b'{"km": "kmserve-tiny", "question": "q"}', {"Content-Type": "text/plain"},
                 422, "validation_error", id="query-as-text-plain"),
    pytest.param("POST", "/v1/chat/completions", b"model=kmserve-tiny",
                 {"Content-Type": "application/x-www-form-urlencoded"}, 422, "validation_error", id="chat-as-form"),
    pytest.param("POST", "/v1/documents", TEXT.encode(), {"Content-Type": "text/plain"}, 415,
                 "unsupported_media_type", id="document-as-text-plain"),
    pytest.param("POST", "/v1/documents", b"--x\r\n\r\n", {"Content-Type": "multipart/form-data"}, 400,
                 "bad_request", id="multipart-without-boundary"),
    pytest.param("POST", "/admin/adapters", b"not multipart", {"Content-Type": "multipart/form-data; boundary=x"},
                 400, "bad_request", id="adapter-garbage-multipart"),
    pytest.param("GET", "/v1/nothing-here", None, {}, 404, "not_found", id="unknown-route"),
    pytest.param("PATCH", "/v1/documents", None, {}, 405, "method_not_allowed", id="wrong-method"),
    pytest.param("DELETE", "/v1/query", None, {}, 405, "method_not_allowed", id="wrong-method-on-post-route"),
])
def test_malformed_requests_are_4xx_in_the_error_shape(
    live: Live, method: str, path: str, content: bytes | None, headers: dict[str, str], status: int, code: str
) -> None:
    assert_error(raw(live, method, path, content, headers=headers), status, code)


@pytest.mark.parametrize(("path", "body", "message"), [
    pytest.param("/v1/chat/completions", b'{"model": "kmserve-tiny", "messages": [{"role": "user", "content": "hi"}],'
                 b' "max_tokens": 1, "temperature": NaN}', "less than or equal to 2", id="nan-temperature"),
    pytest.param("/v1/query", b'{"km": "kmserve-tiny", "question": "q", "max_tokens": 1, "top_p": Infinity}',
                 "less than or equal to 1", id="infinite-top-p"),
    pytest.param("/v1/documents", b'{"title": "t", "text": "nan meta", "metadata": {"score": NaN}}', MSG_NOT_FINITE,
                 id="nan-metadata"),
    pytest.param("/v1/documents", b'{"title": "t", "text": "inf train", "train": {"method": "none", "lr": 1e999}}',
                 MSG_NOT_FINITE, id="infinite-train-option"),
    pytest.param("/admin/train", b'{"kind": "train_ke", "payload": {"steps": -Infinity}}', MSG_NOT_FINITE,
                 id="infinite-payload"),
])
def test_nan_and_infinity_are_422(live: Live, path: str, body: bytes, message: str) -> None:
    assert_error(raw(live, "POST", path, body, headers=JSON), 422, "validation_error", message)


def test_deep_metadata_is_422(live: Live) -> None:
    metadata = json.dumps({"a": json.loads("[" * 40 + "]" * 40)})
    body = f'{{"title": "t", "text": "deep metadata", "metadata": {metadata}}}'
    assert_error(raw(live, "POST", "/v1/documents", body, headers=JSON), 422, "validation_error", MSG_TOO_DEEP)


@pytest.mark.parametrize(("method", "path", "body"), [
    pytest.param("GET", f"/v1/documents/{BIG}", None, id="document-id"),
    pytest.param("DELETE", f"/v1/documents/{BIG}", None, id="document-delete"),
    pytest.param("GET", f"/v1/jobs/{BIG}/events", None, id="job-events"),
    pytest.param("POST", f"/admin/jobs/{BIG}/retry", None, id="job-retry"),
    pytest.param("POST", f"/admin/adapters/{BIG}/load", None, id="adapter-load"),
    pytest.param("DELETE", f"/admin/keys/{BIG}", None, id="key-revoke"),
    pytest.param("GET", f"/admin/jobs?offset={BIG}", None, id="offset"),
    pytest.param("GET", f"/admin/adapters?document_id={BIG}", None, id="document-filter"),
    pytest.param("GET", f"/v1/jobs/1/events?after={BIG}", None, id="events-after"),
    pytest.param("POST", "/v1/query", {"document_id": BIG, "question": "q"}, id="query-document"),
    pytest.param("POST", "/v1/query", {"document_id": 1, "question": "q", "rag": {"document_ids": [BIG]}},
                 id="rag-documents"),
    pytest.param("POST", "/v1/completions", {"model": "kmserve-tiny", "prompt": "hi", "max_tokens": 1, "seed": BIG},
                 id="seed"),
    pytest.param("POST", "/admin/train", {"kind": "train_ke", "document_id": BIG}, id="train-document"),
    pytest.param("PUT", "/admin/aliases/big", {"adapter_id": BIG}, id="alias-adapter"),
])
def test_integers_past_64_bits_are_422(live: Live, method: str, path: str, body: dict[str, Any] | None) -> None:
    content = None if body is None else json.dumps(body)
    response = raw(live, method, path, content, headers=JSON)
    assert_error(response, 422, "validation_error", f"less than or equal to {DB_INT_MAX}")


@pytest.mark.parametrize("body", [
    {"km": f"km:{BIG}", "question": "q", "max_tokens": 1},
    {"model": f"km:{BIG}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
], ids=["query", "chat"])
def test_km_name_past_64_bits_is_an_invalid_model(live: Live, body: dict[str, Any]) -> None:
    path = "/v1/query" if "km" in body else "/v1/chat/completions"
    assert_error(raw(live, "POST", path, json.dumps(body), headers=JSON), 400, "invalid_model", f"km:{BIG}")


def test_last_event_id_past_64_bits_ends_the_stream(live: Live) -> None:
    body = {"title": "events", "text": f"events {TEXT}", "train": {"method": "none"}}
    created = raw(live, "POST", "/v1/documents", json.dumps(body), headers=JSON)
    assert created.status_code == 202, created.text
    end_live_jobs(live.state)
    job_id = created.json()["jobs"][0]["id"]
    response = raw(live, "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(BIG)})
    assert response.status_code == 200, response.text
    assert "event: end" in response.text


@pytest.mark.parametrize(("method", "path", "body", "message"), [
    pytest.param("POST", "/v1/documents", {"title": "a\x00b", "text": "nul title"}, MSG_NUL, id="title"),
    pytest.param("POST", "/v1/documents", {"title": "t", "text": "nul key", "metadata": {"\x00": 1}}, MSG_NUL,
                 id="metadata-key"),
    pytest.param("POST", "/admin/keys", {"name": "a\x00b", "scopes": ["query"]}, MSG_NUL, id="key-name"),
    pytest.param("POST", "/v1/query", {"km": "kmserve-tiny", "ke": "x\x00", "question": "q", "max_tokens": 1},
                 MSG_NUL, id="ke-name"),
    pytest.param("POST", "/v1/chat/completions", {**CHAT, "model": "km:1\x00"}, MSG_NUL, id="model-name"),
    pytest.param("GET", "/admin/adapters?lineage=ke%00x", None, MSG_NUL, id="lineage-filter"),
    pytest.param("GET", "/admin/jobs?kind=in%00gest", None, MSG_NUL, id="kind-filter"),
    pytest.param("PUT", "/admin/aliases/a%00b", {"adapter_id": 1}, "should match pattern", id="alias-name"),
])
def test_nul_characters_are_422(live: Live, method: str, path: str, body: Any, message: str) -> None:
    content = None if body is None else json.dumps(body)
    assert_error(raw(live, method, path, content, headers=JSON), 422, "validation_error", message)


@pytest.mark.parametrize(("path", "body"), [
    pytest.param("/v1/chat/completions", b'{"model": "kmserve-tiny", "messages": [{"role": "user", '
                 b'"content": "\\ud800"}], "max_tokens": 1}', id="chat-content"),
    pytest.param("/v1/chat/completions", b'{"model": "kmserve-tiny", "messages": [{"role": "user", '
                 b'"content": [{"type": "text", "text": "a\\udfff"}]}], "max_tokens": 1}', id="chat-text-part"),
    pytest.param("/v1/completions", b'{"model": "kmserve-tiny", "prompt": ["ok", "\\ud800"], "max_tokens": 1}',
                 id="prompt-list"),
    pytest.param("/v1/completions", b'{"model": "kmserve-tiny", "prompt": "a", "stop": "\\udc00", "max_tokens": 1}',
                 id="stop"),
])
def test_lone_surrogates_are_422(live: Live, path: str, body: bytes) -> None:
    assert_error(raw(live, "POST", path, body, headers=JSON), 422, "validation_error", MSG_SURROGATE)


@pytest.mark.postgres
def test_postgres_refusing_a_value_is_422_not_500(live: Live) -> None:
    if live.state.engine.dialect.name != "postgresql":
        pytest.skip("only PostgreSQL refuses NUL in a query parameter")
    response = raw(live, "DELETE", "/admin/aliases/a%00b")
    assert_error(response, 422, "invalid_value", MSG_UNSTORABLE.split("(", 1)[0])


def test_unicode_edge_values_are_stored_as_given(live: Live) -> None:
    title = "\u202eevil\u200f \u00e9\u0301 \U0001f600 \u05e9\u05dc\u05d5\u05dd"
    body = {"title": title, "text": f"edge {title}", "metadata": {"\u202e": "\U0001f600", "big": 10**40}}
    created = raw(live, "POST", "/v1/documents", json.dumps(body), headers=JSON)
    assert created.status_code == 202, created.text
    fetched = raw(live, "GET", f"/v1/documents/{created.json()['id']}").json()
    assert (fetched["title"], fetched["metadata"]) == (title, body["metadata"])
