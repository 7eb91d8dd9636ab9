"""Document routes through the real app: uploads (JSON, .txt/.md/.pdf), limits, types, dedupe, tenants, delete."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from registry.adapters import get_adapter
from registry.aliases import set_alias
from registry.api_keys import create_api_key
from registry.db import transaction
from registry.documents import get_document
from registry.errors import NotFoundError
from registry.models import JobStatus
from server.app import create_app
from server.auth import MSG_NO_SCOPE
from server.errors import MSG_TOO_LARGE
from server.services.document_files import (
    MSG_CONTENT_TYPE,
    MSG_EMPTY,
    MSG_EXTENSION,
    MSG_NO_FILE,
    MSG_NOT_PDF,
    MSG_NOT_TEXT,
    MSG_RANK,
    safe_basename,
)
from server.state import AppState
from tests.factories import make_adapter

TEXT = "The capital of Varo is Lumen. Lumen lies on the river Sel.\n"
SMALL_LIMIT = 1000


def tiny_pdf(text: str = "Lumen is the capital of Varo.") -> bytes:
    """A minimal well-formed one-page PDF (objects, xref table and trailer with correct offsets)."""
    content = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


@pytest.fixture
def client(app_settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as test_client:
        yield test_client


@pytest.fixture
def small_client(app_settings: Any) -> Iterator[TestClient]:
    settings = app_settings.model_copy(update={"max_upload_bytes": SMALL_LIMIT})
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def state_of(client: TestClient) -> AppState:
    return client.app.state.kmserve  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {state_of(client).settings.admin_key_file.read_text().strip()}"}


def key_for(client: TestClient, *scopes: str, tenant: str = "default") -> dict[str, str]:
    with transaction(state_of(client).sessions) as session:
        _, plaintext = create_api_key(session, "test", scopes, tenant=tenant)
    return {"Authorization": f"Bearer {plaintext}"}


def upload_json(client: TestClient, headers: dict[str, str], text: str = TEXT, **body: Any) -> Any:
    return client.post("/v1/documents", json={"title": "Varo", "text": text, **body}, headers=headers)


def upload_file(client: TestClient, headers: dict[str, str], name: str, data: bytes, **fields: str) -> Any:
    return client.post("/v1/documents", files={"file": (name, data, "application/octet-stream")}, data=fields,
                       headers=headers)


def assert_error(response: Any, status: int, code: str, message: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    if message is not None:
        assert error["message"] == message


def test_json_upload_queues_the_sdcd_chain_in_order(client: TestClient, admin: dict[str, str]) -> None:
    response = upload_json(client, admin, metadata={"lang": "en"})
    assert response.status_code == 202, response.text
    document = response.json()
    assert document["created"] is True
    assert document["content_hash"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert (document["status"], document["media_type"], document["size_bytes"]) == ("pending", "text/plain", len(TEXT))
    assert (document["metadata"], document["km"], document["source_name"]) == ({"lang": "en"}, None, None)
    jobs = document["jobs"]
    assert [j["kind"] for j in jobs] == ["ingest", "synthesize", "train_km"]
    assert [j["depends_on_id"] for j in jobs] == [None, jobs[0]["id"], jobs[1]["id"]]
    assert {(j["status"], j["document_id"]) for j in jobs} == {("queued", document["id"])}
    queued = state_of(client).queue.get(jobs[0]["id"])
    assert queued.tenant == "default"
    assert queued.payload["train"]["method"] == "sdcd"
    assert state_of(client).store.get_blob(queued.payload["blob_uri"]) == TEXT.encode()


@pytest.mark.parametrize(("method", "kinds"), [
    ("none", ["ingest"]), ("lm", ["ingest", "train_km"]), ("ddcd", ["ingest", "train_km"]),
])
def test_train_method_picks_the_chain_and_options_reach_the_payload(
    client: TestClient, admin: dict[str, str], method: str, kinds: list[str]
) -> None:
    train = {"method": method, "steps": 7, "rank": 8, "lr": 0.002, "check_answers": True}
    response = upload_json(client, admin, text=f"{method} {TEXT}", train=train)
    assert response.status_code == 202, response.text
    jobs = response.json()["jobs"]
    assert [j["kind"] for j in jobs] == kinds
    for job in jobs:
        assert state_of(client).queue.get(job["id"]).payload["train"] == train


@pytest.mark.parametrize(("name", "data", "media_type"), [
    ("notes.txt", TEXT.encode(), "text/plain"),
    ("notes.md", f"# Varo\n\n{TEXT}".encode(), "text/markdown"),
    ("Paper.PDF", tiny_pdf(), "application/pdf"),
])
def test_multipart_upload_of_each_type(
    client: TestClient, admin: dict[str, str], name: str, data: bytes, media_type: str
) -> None:
    response = upload_file(client, admin, name, data)
    assert response.status_code == 202, response.text
    document = response.json()
    assert (document["media_type"], document["source_name"]) == (media_type, name)
    assert (document["title"], document["size_bytes"]) == (name.rsplit(".", 1)[0], len(data))
    assert document["content_hash"] == hashlib.sha256(data).hexdigest()
    with transaction(state_of(client).sessions) as session:
        text_uri = get_document(session, document["id"]).text_uri
    assert text_uri is not None
    assert state_of(client).store.get_blob(text_uri) == data


def test_multipart_fields_title_metadata_and_train(client: TestClient, admin: dict[str, str]) -> None:
    response = upload_file(client, admin, "a.txt", TEXT.encode(), title="Atlas of Varo",
                           metadata=json.dumps({"source": "wiki"}), train=json.dumps({"method": "lm"}))
    assert response.status_code == 202, response.text
    document = response.json()
    assert (document["title"], document["metadata"]) == ("Atlas of Varo", {"source": "wiki"})
    assert [j["kind"] for j in document["jobs"]] == ["ingest", "train_km"]


def test_same_content_returns_the_existing_document(client: TestClient, admin: dict[str, str]) -> None:
    first = upload_json(client, admin).json()
    again = upload_file(client, admin, "copy.txt", TEXT.encode())
    assert again.status_code == 200, again.text
    assert (again.json()["id"], again.json()["created"]) == (first["id"], False)
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first["jobs"]]
    assert client.get("/v1/documents", headers=admin).json()["count"] == 1


def test_oversized_upload_is_413_naming_the_limit(small_client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {state_of(small_client).settings.admin_key_file.read_text().strip()}"}
    message = MSG_TOO_LARGE.format(what="document", limit=SMALL_LIMIT)
    big = "x" * (SMALL_LIMIT + 1)
    assert_error(upload_file(small_client, headers, "big.txt", big.encode()), 413, "payload_too_large", message)
    assert_error(upload_json(small_client, headers, text=big), 413, "payload_too_large", message)
    declared = small_client.post("/v1/documents", content=b"{" + b" " * 300_000 + b"}",
                                 headers={**headers, "Content-Type": "application/json"})
    # A declared length over the limit is refused by the body-limit middleware before anything is read.
    assert_error(declared, 413, "payload_too_large", MSG_TOO_LARGE.format(what="request body", limit=SMALL_LIMIT))
    chunked = small_client.post("/v1/documents", content=iter([b"{" + b" " * 100_000] * 3),
                                headers={**headers, "Content-Type": "application/json"})
    assert_error(chunked, 413, "payload_too_large", message)
    assert upload_file(small_client, headers, "fits.txt", b"y" * SMALL_LIMIT).status_code == 202


@pytest.mark.parametrize(("name", "data", "message"), [
    ("tool.exe", b"MZ\x90\x00", MSG_EXTENSION.format(name="tool.exe")),
    ("noext", TEXT.encode(), MSG_EXTENSION.format(name="noext")),
    ("photo.txt", bytes(range(256)), MSG_NOT_TEXT.format(name="file 'photo.txt'")),
    ("latin1.md", "café crème".encode("latin-1"), MSG_NOT_TEXT.format(name="file 'latin1.md'")),
    ("controls.txt", b"\x01\x02\x03\x04 ab\x05\x06", MSG_NOT_TEXT.format(name="file 'controls.txt'")),
    ("fake.pdf", b"<html>not a pdf</html>", MSG_NOT_PDF.format(name="file 'fake.pdf'")),
])
def test_unsupported_types_are_415(
    client: TestClient, admin: dict[str, str], name: str, data: bytes, message: str
) -> None:
    assert_error(upload_file(client, admin, name, data), 415, "unsupported_media_type", message)


def test_other_content_types_are_415(client: TestClient, admin: dict[str, str]) -> None:
    response = client.post("/v1/documents", content=TEXT, headers={**admin, "Content-Type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type", MSG_CONTENT_TYPE.format(got="text/plain"))


def test_empty_or_invalid_uploads_are_422(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(upload_file(client, admin, "empty.txt", b""), 422, "empty_document", MSG_EMPTY)
    assert_error(upload_file(client, admin, "blank.md", b" \n\t\n"), 422, "empty_document", MSG_EMPTY)
    assert_error(upload_json(client, admin, text="   "), 422, "empty_document", MSG_EMPTY)
    no_file = client.post("/v1/documents", data={"title": "t"}, files={"other": ("a.txt", b"x")}, headers=admin)
    assert_error(no_file, 422, "invalid_upload", MSG_NO_FILE)
    assert_error(upload_json(client, admin, train={"method": "magic"}), 422, "validation_error")
    assert_error(upload_file(client, admin, "a.txt", b"abc", train="{not json"), 422, "validation_error")
    assert_error(upload_json(client, admin, title=""), 422, "validation_error")
    not_a_switch = upload_json(client, admin, train={"check_answers": "yes"})
    assert_error(not_a_switch, 422, "validation_error")
    assert "check_answers must be true or false" in not_a_switch.text
    too_big_rank = upload_json(client, admin, train={"rank": 10_000})
    assert_error(too_big_rank, 422, "invalid_upload", MSG_RANK.format(rank=10_000, limit=64))
    malformed = client.post("/v1/documents", content=b"{", headers={**admin, "Content-Type": "application/json"})
    assert_error(malformed, 422, "validation_error")


@pytest.mark.parametrize(("filename", "expected"), [
    ("../../etc/notes.txt", "notes.txt"),
    ("/etc/cron.d/job.md", "job.md"),
    ("C:\\Users\\me\\report.txt", "report.txt"),
])
def test_path_like_names_are_reduced_to_their_basename(
    client: TestClient, admin: dict[str, str], filename: str, expected: str
) -> None:
    response = upload_file(client, admin, filename, f"{filename} {TEXT}".encode())
    assert response.status_code == 202, response.text
    assert response.json()["source_name"] == expected
    with transaction(state_of(client).sessions) as session:
        text_uri = get_document(session, response.json()["id"]).text_uri
    assert text_uri is not None
    assert "/blobs/" in text_uri
    assert expected not in text_uri


@pytest.mark.parametrize(("raw", "safe"), [
    ("a\x00b.txt", "ab.txt"), ("..", ""), ("dir/..", ""), ("\x1b[31mred.md", "[31mred.md"), ("x/", ""),
])
def test_safe_basename(raw: str, safe: str) -> None:
    assert safe_basename(raw) == safe


def test_list_get_and_filters(client: TestClient, admin: dict[str, str]) -> None:
    ids = [upload_json(client, admin, text=f"{n} {TEXT}").json()["id"] for n in range(3)]
    listed = client.get("/v1/documents", headers=admin).json()
    assert (listed["count"], [d["id"] for d in listed["data"]]) == (3, ids[::-1])
    page = client.get("/v1/documents", params={"limit": 1, "offset": 1}, headers=admin).json()
    assert (page["count"], [d["id"] for d in page["data"]]) == (3, [ids[1]])
    assert client.get("/v1/documents", params={"status": "ready"}, headers=admin).json()["count"] == 0
    assert client.get("/v1/documents", params={"status": "pending"}, headers=admin).json()["count"] == 3
    assert_error(client.get("/v1/documents", params={"status": "bogus"}, headers=admin), 422, "validation_error")
    detail = client.get(f"/v1/documents/{ids[0]}", headers=admin).json()
    assert [j["kind"] for j in detail["jobs"]] == ["ingest", "synthesize", "train_km"]
    assert_error(client.get("/v1/documents/999999", headers=admin), 404, "not_found")


def test_detail_shows_the_km_version_and_delete_drops_it(client: TestClient, admin: dict[str, str]) -> None:
    document = upload_json(client, admin).json()
    state = state_of(client)
    with transaction(state.sessions) as session:
        v1 = make_adapter(session, lineage=f"km:{document['id']}", document_id=document["id"])
        v2 = make_adapter(session, lineage=f"km:{document['id']}", document_id=document["id"])
        set_alias(session, f"km:{document['id']}", v2.id)
    assert client.get(f"/v1/documents/{document['id']}", headers=admin).json()["km"] == {
        "adapter_id": v2.id, "version": 2}
    assert client.get("/v1/documents", headers=admin).json()["data"][0]["km"]["version"] == 2
    assert client.delete(f"/v1/documents/{document['id']}", headers=admin).status_code == 204
    assert_error(client.get(f"/v1/documents/{document['id']}", headers=admin), 404, "not_found")
    with transaction(state.sessions) as session:
        for adapter in (v1, v2):
            with pytest.raises(NotFoundError):
                get_adapter(session, adapter.id)
    assert_error(client.delete(f"/v1/documents/{document['id']}", headers=admin), 404, "not_found")


def test_delete_cancels_queued_jobs_and_asks_running_ones_to_stop(client: TestClient, admin: dict[str, str]) -> None:
    jobs = upload_json(client, admin).json()["jobs"]
    document_id = jobs[0]["document_id"]
    queue = state_of(client).queue
    claimed = queue.claim("worker-1", ["ingest"])
    assert claimed is not None
    assert claimed.id == jobs[0]["id"]
    assert client.delete(f"/v1/documents/{document_id}", headers=admin).status_code == 204
    ingest, synthesize, train = (queue.get(j["id"]) for j in jobs)
    assert (ingest.status, ingest.cancel_requested) == (JobStatus.RUNNING, True)
    assert (synthesize.status, train.status) == (JobStatus.CANCELLED, JobStatus.CANCELLED)


def test_other_tenants_documents_are_404(client: TestClient, admin: dict[str, str]) -> None:
    mine = upload_json(client, admin).json()
    other = key_for(client, "query", "upload", tenant="acme")
    assert client.get("/v1/documents", headers=other).json() == {"data": [], "count": 0}
    assert_error(client.get(f"/v1/documents/{mine['id']}", headers=other), 404, "not_found")
    assert_error(client.delete(f"/v1/documents/{mine['id']}", headers=other), 404, "not_found")
    theirs = upload_json(client, other)
    assert theirs.status_code == 202  # the same content is a separate document in another tenant
    assert theirs.json()["id"] != mine["id"]
    assert client.get(f"/v1/documents/{mine['id']}", headers=admin).status_code == 200


def test_scopes(client: TestClient, admin: dict[str, str]) -> None:
    document_id = upload_json(client, admin).json()["id"]
    query = key_for(client, "query")
    assert_error(upload_json(client, query, text="other"), 403, "forbidden", MSG_NO_SCOPE.format(scope="upload"))
    assert_error(client.delete(f"/v1/documents/{document_id}", headers=query), 403, "forbidden")
    assert client.get(f"/v1/documents/{document_id}", headers=query).status_code == 200
    assert_error(client.post("/v1/documents", json={"title": "t", "text": "x"}), 401, "unauthorized")


def test_openapi_documents_both_upload_forms(client: TestClient) -> None:
    body = client.get("/openapi.json").json()["paths"]["/v1/documents"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert body["application/json"]["schema"]["properties"]["train"]["properties"]["method"]["default"] == "sdcd"
