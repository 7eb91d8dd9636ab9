"""One request description per route, shared by the sync and async clients: method, path, body and result type."""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from clients.sdk import _models as m

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
FileField = tuple[str, bytes, str]
Train = m.TrainOptions | Mapping[str, Any] | None
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
ADAPTER_FILES = {"adapter_config": "adapter_config.json", "adapter_model": "adapter_model.safetensors"}


@dataclass(frozen=True)
class Call(Generic[T]):
    """An HTTP request and how to read its successful response."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, FileField] | None = None

    @property
    def idempotent(self) -> bool:
        """Whether the request may be retried safely."""
        return self.method in IDEMPOTENT_METHODS


def model(cls: type[M]) -> Callable[[httpx.Response], M]:
    """A parser that validates the JSON body as `cls`."""
    return lambda response: cls.model_validate(response.json())


def no_content(_: httpx.Response) -> None:
    """A parser for 204 responses."""


def _params(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _train(train: Train) -> dict[str, Any]:
    if isinstance(train, m.TrainOptions):
        return train.model_dump(exclude_none=True)
    return dict(train or {})


def _text_body(title: str, text: str, metadata: Mapping[str, Any] | None, train: Train) -> dict[str, Any]:
    body: dict[str, Any] = {"title": title, "text": text, "metadata": dict(metadata or {})}
    if train is not None:
        body["train"] = _train(train)
    return body


def _file_form(path: Path, title: str | None, metadata: Mapping[str, Any] | None, train: Train
               ) -> tuple[dict[str, str], dict[str, FileField]]:
    data = _params(title=title, metadata=json.dumps(dict(metadata)) if metadata else None,
                   train=json.dumps(_train(train)) if train is not None else None)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return data, {"file": (path.name, path.read_bytes(), media_type)}


def upload_text(title: str, text: str, metadata: Mapping[str, Any] | None, train: Train,
                document_id: int | None = None) -> Call[m.DocumentUpload]:
    """POST /v1/documents (or PUT /v1/documents/{id}) with JSON text."""
    method, path = ("POST", "/v1/documents") if document_id is None else ("PUT", f"/v1/documents/{document_id}")
    return Call(method, path, model(m.DocumentUpload), json=_text_body(title, text, metadata, train))


def upload_file(path: Path, title: str | None, metadata: Mapping[str, Any] | None, train: Train,
                document_id: int | None = None) -> Call[m.DocumentUpload]:
    """POST /v1/documents (or PUT /v1/documents/{id}) with a multipart file."""
    method, url = ("POST", "/v1/documents") if document_id is None else ("PUT", f"/v1/documents/{document_id}")
    data, files = _file_form(Path(path), title, metadata, train)
    return Call(method, url, model(m.DocumentUpload), data=data, files=files)


def list_documents(status: str | None, limit: int, offset: int) -> Call[m.DocumentList]:
    """GET /v1/documents."""
    return Call("GET", "/v1/documents", model(m.DocumentList), params=_params(status=status, limit=limit,
                                                                               offset=offset))


def get_document(document_id: int) -> Call[m.DocumentDetail]:
    """GET /v1/documents/{id}."""
    return Call("GET", f"/v1/documents/{document_id}", model(m.DocumentDetail))


def delete_document(document_id: int) -> Call[None]:
    """DELETE /v1/documents/{id}."""
    return Call("DELETE", f"/v1/documents/{document_id}", no_content)


def get_job(job_id: int) -> Call[m.Job]:
    """GET /v1/jobs/{id}."""
    return Call("GET", f"/v1/jobs/{job_id}", model(m.Job))


def cancel_job(job_id: int) -> Call[m.Job]:
    """POST /v1/jobs/{id}/cancel."""
    return Call("POST", f"/v1/jobs/{job_id}/cancel", model(m.Job))


def job_events(job_id: int, after: int | None) -> Call[None]:
    """GET /v1/jobs/{id}/events (a stream)."""
    return Call("GET", f"/v1/jobs/{job_id}/events", no_content, params=_params(after=after))


def query_body(question: str, document_id: int | None, km: str | None, rerank: bool, options: Mapping[str, Any]
               ) -> dict[str, Any]:
    """The JSON of POST /v1/query; `rag` may be an int (top_k) or a dict, `rerank` sets rag.rerank."""
    body = {"question": question, **_params(document_id=document_id, km=km), **_params(**options)}
    rag = body.get("rag")
    if isinstance(rag, int) or (rerank and rag is None):
        body["rag"] = {"top_k": rag or 5}
    if rerank:
        body["rag"] = {**body["rag"], "rerank": True}
    return body


def query(body: dict[str, Any]) -> Call[m.QueryResult]:
    """POST /v1/query."""
    return Call("POST", "/v1/query", model(m.QueryResult), json=body)


def list_adapters(kind: str | None, document_id: int | None, lineage: str | None, limit: int, offset: int
                  ) -> Call[m.AdapterList]:
    """GET /admin/adapters."""
    params = _params(kind=kind, document_id=document_id, lineage=lineage, limit=limit, offset=offset)
    return Call("GET", "/admin/adapters", model(m.AdapterList), params=params)


def get_adapter(adapter_id: int) -> Call[m.Adapter]:
    """GET /admin/adapters/{id}."""
    return Call("GET", f"/admin/adapters/{adapter_id}", model(m.Adapter))


def upload_adapter(directory: Path, kind: str, document_id: int | None, lineage: str | None,
                   alias: str | None) -> Call[m.Adapter]:
    """POST /admin/adapters with a PEFT directory's adapter_config.json and adapter_model.safetensors."""
    root = Path(directory)
    files = {name: (file, (root / file).read_bytes(), "application/octet-stream")
             for name, file in ADAPTER_FILES.items()}
    data = _params(kind=kind, document_id=str(document_id) if document_id else None, lineage=lineage, alias=alias)
    return Call("POST", "/admin/adapters", model(m.Adapter), data=data, files=files)


def delete_adapter(adapter_id: int) -> Call[None]:
    """DELETE /admin/adapters/{id}."""
    return Call("DELETE", f"/admin/adapters/{adapter_id}", no_content)


def engine_action(adapter_id: int, action: str, body: dict[str, Any]) -> Call[m.EngineAdapter]:
    """POST /admin/adapters/{id}/load|unload|pin."""
    return Call("POST", f"/admin/adapters/{adapter_id}/{action}", model(m.EngineAdapter), json=body)


def engine() -> Call[m.EngineStats]:
    """GET /admin/engine."""
    return Call("GET", "/admin/engine", model(m.EngineStats))


def list_aliases() -> Call[m.AliasList]:
    """GET /admin/aliases."""
    return Call("GET", "/admin/aliases", model(m.AliasList))


def set_alias(name: str, adapter_id: int) -> Call[m.Alias]:
    """PUT /admin/aliases/{name}."""
    return Call("PUT", f"/admin/aliases/{name}", model(m.Alias), json={"adapter_id": adapter_id})


def delete_alias(name: str) -> Call[None]:
    """DELETE /admin/aliases/{name}."""
    return Call("DELETE", f"/admin/aliases/{name}", no_content)


def create_key(name: str, scopes: Sequence[str]) -> Call[m.ApiKeyCreated]:
    """POST /admin/keys."""
    return Call("POST", "/admin/keys", model(m.ApiKeyCreated), json={"name": name, "scopes": list(scopes)})


def list_keys(include_revoked: bool) -> Call[m.ApiKeyList]:
    """GET /admin/keys."""
    return Call("GET", "/admin/keys", model(m.ApiKeyList), params={"include_revoked": include_revoked})


def revoke_key(key_id: int) -> Call[m.ApiKey]:
    """DELETE /admin/keys/{id}."""
    return Call("DELETE", f"/admin/keys/{key_id}", model(m.ApiKey))


def list_jobs(status: str | None, kind: str | None, document_id: int | None, limit: int, offset: int
              ) -> Call[m.JobList]:
    """GET /admin/jobs."""
    params = _params(status=status, kind=kind, document_id=document_id, limit=limit, offset=offset)
    return Call("GET", "/admin/jobs", model(m.JobList), params=params)


def retry_job(job_id: int) -> Call[m.Job]:
    """POST /admin/jobs/{id}/retry."""
    return Call("POST", f"/admin/jobs/{job_id}/retry", model(m.Job))


def train(kind: str, payload: Mapping[str, Any] | None, document_id: int | None) -> Call[m.Job]:
    """POST /admin/train."""
    body = {"kind": kind, "payload": dict(payload or {}), **_params(document_id=document_id)}
    return Call("POST", "/admin/train", model(m.Job), json=body)
