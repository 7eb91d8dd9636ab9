"""Schemas of the document routes: uploads (JSON or multipart), training options, documents with their jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Json, model_validator

from registry.models import DocumentStatus
from server.schemas.common import JsonObject, Text, check_json
from server.schemas.jobs import JobPublic

TrainMethod = Literal["sdcd", "ddcd", "lm", "none"]
TITLE_MAX = 512


class TrainOptions(BaseModel):
    """How to train the document's knowledge module; keys beyond these are passed to the trainer as given."""

    model_config = ConfigDict(extra="allow")

    method: TrainMethod = Field(
        "sdcd", description="sdcd: synthetic-data DCD; ddcd: document DCD; lm: next-token loss; none: RAG only."
    )
    steps: int | None = Field(None, ge=1, description="Optimizer steps; unset = the training profile's default.")
    rank: int | None = Field(None, ge=1, description="LoRA rank; unset = 16.")

    @model_validator(mode="after")
    def _storable_extras(self) -> TrainOptions:
        extras = self.model_extra or {}
        check_json(extras)
        # sdcd: re-answer every synthetic QA pair with the chunk in context before training on it
        if not isinstance(extras.get("check_answers", False), bool):
            raise ValueError(f"check_answers must be true or false, got {extras['check_answers']!r}")
        return self


class DocumentCreate(BaseModel):
    """A document given as text (the JSON form of an upload)."""

    title: Text = Field(min_length=1, max_length=TITLE_MAX)
    text: str
    metadata: JsonObject = Field(default_factory=dict)
    train: TrainOptions = Field(default_factory=TrainOptions)


class DocumentForm(BaseModel):
    """The fields next to `file` in a multipart upload; `metadata` and `train` are JSON strings."""

    title: Text | None = Field(None, min_length=1, max_length=TITLE_MAX)
    metadata: Json[JsonObject] | None = None
    train: Json[TrainOptions] | None = None


class KmPublic(BaseModel):
    """The knowledge-module version the document's `km:<id>` alias serves."""

    adapter_id: int
    version: int


class DocumentPublic(BaseModel):
    """A document as listed."""

    id: int
    tenant: str
    title: str
    status: DocumentStatus
    content_hash: str = Field(description="SHA-256 of the uploaded bytes; the same content is stored once.")
    size_bytes: int
    media_type: str
    source_name: str | None
    token_count: int | None
    metadata: dict[str, Any]
    revision: int = Field(description="1 at upload; +1 each time PUT /v1/documents/{id} gives it new content.")
    created_at: datetime
    km: KmPublic | None


class DocumentDetailPublic(DocumentPublic):
    """A document with its jobs (ingest, synthesize, train_km), oldest first."""

    jobs: list[JobPublic]


class DocumentUploadPublic(DocumentDetailPublic):
    """The answer to an upload: `created` is false when the same content was already there (status 200)."""

    created: bool


class DocumentsPublic(BaseModel):
    """A page of documents and how many match in all."""

    data: list[DocumentPublic]
    count: int


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {key: _inline_refs(value, defs) for key, value in node.items() if key != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node


def upload_openapi() -> dict[str, Any]:
    """The request body of POST /v1/documents for OpenAPI: JSON text or a multipart file."""
    schema = DocumentCreate.model_json_schema()
    multipart = {
        "type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "A .txt, .md or .pdf file."},
            "title": {"type": "string", "description": "Defaults to the file name."},
            "metadata": {"type": "string", "description": "A JSON object."},
            "train": {"type": "string", "description": "TrainOptions as JSON, e.g. {\"method\": \"lm\"}."},
        },
    }
    content = {"application/json": {"schema": _inline_refs(schema, schema.get("$defs", {}))},
               "multipart/form-data": {"schema": multipart}}
    return {"requestBody": {"required": True, "content": content}}
