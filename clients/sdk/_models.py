"""Typed results of the kmserve API, mirroring the server's public schemas (unknown fields are ignored)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TrainOptions(_Model):
    """How to train a document's knowledge module: method sdcd|ddcd|lm|none, optimizer steps and LoRA rank."""

    model_config = ConfigDict(extra="allow")

    method: str = "sdcd"
    steps: int | None = None
    rank: int | None = None


class Job(_Model):
    """A queued, running or finished job."""

    id: int
    kind: str
    status: str
    progress: float
    message: str
    metrics: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    document_id: int | None
    depends_on_id: int | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None

    @property
    def is_final(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in FINAL_JOB_STATUSES


class JobList(_Model):
    """A page of jobs and the total matching."""

    data: list[Job]
    count: int


class JobEvent(_Model):
    """One event in a job's life (its `type` is progress, claimed, succeeded, ...)."""

    id: int
    job_id: int
    type: str
    data: dict[str, Any]
    created_at: datetime


class Km(_Model):
    """The knowledge-module version a document serves."""

    adapter_id: int
    version: int


class Document(_Model):
    """A document as listed."""

    id: int
    title: str
    status: str
    content_hash: str
    size_bytes: int
    media_type: str
    source_name: str | None
    token_count: int | None
    metadata: dict[str, Any]
    revision: int
    created_at: datetime
    km: Km | None


class DocumentDetail(Document):
    """A document with its jobs, oldest first."""

    jobs: list[Job]


class DocumentUpload(DocumentDetail):
    """An upload's answer; `created` is false when the same content was already there."""

    created: bool


class DocumentList(_Model):
    """A page of documents and the total matching."""

    data: list[Document]
    count: int


class Passage(_Model):
    """A retrieved passage."""

    document_id: int
    index: int
    text: str
    score: float


class Usage(_Model):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_uncompressed: int | None = None


class QueryResult(_Model):
    """An answer and what produced it: adapters, passages, usage and timings."""

    answer: str
    finish_reason: str
    adapters: dict[str, dict[str, Any] | None]
    passages: list[Passage]
    compressed: str | None = None
    usage: Usage
    timings_ms: dict[str, float]


class Adapter(_Model):
    """One adapter version in the registry, with the aliases pointing at it."""

    id: int
    tenant: str
    kind: str
    lineage: str
    version: int
    document_id: int | None
    base_model: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    sha256: str
    size_bytes: int
    uri: str
    status: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    writer_versions: dict[str, Any]
    created_at: datetime
    aliases: list[str] = Field(default_factory=list)


class AdapterList(_Model):
    """A page of adapters and the total matching."""

    data: list[Adapter]
    count: int


class EngineAdapter(_Model):
    """An adapter's state in the generation engine."""

    id: int
    kind: str
    lineage: str
    version: int
    loaded: bool
    pinned: bool


class EngineStats(_Model):
    """The generation engine: resident adapters, cache and batching counters."""

    engine: str
    base_model: str
    adapters: list[EngineAdapter]
    loaded_count: int
    pinned_count: int
    capacity: int
    loads: int
    evictions: int
    hits: int
    misses: int
    hit_rate: float
    queued: int
    running: int
    batches: int
    batched_rows: int
    forward_calls: int


class Alias(_Model):
    """An alias and the adapter version it points at."""

    name: str
    adapter_id: int
    lineage: str
    version: int
    revision: int
    updated_at: datetime


class AliasList(_Model):
    """All aliases."""

    data: list[Alias]
    count: int


class ApiKey(_Model):
    """An API key as listed (never its secret)."""

    id: int
    name: str
    prefix: str
    scopes: list[str]
    tenant: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKey):
    """A key just created: `key` is its secret, shown this once."""

    key: str


class ApiKeyList(_Model):
    """API keys."""

    data: list[ApiKey]
    count: int
