"""Schemas of the job routes: a job as clients see it, its events, and training jobs started by an admin."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.models import JobStatus
from server.schemas.common import DB_INT_MAX, JsonObject

TrainKind = Literal[
    "train_ke", "train_compressor", "train_compressor_extractive", "train_compressor_abstractive", "train_reranker",
    "train_reasoner", "train_km",
]


class JobPublic(BaseModel):
    """A job: what it is, where it stands, and what it reported."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    tenant: str
    kind: str
    status: JobStatus
    progress: float = Field(description="0..1")
    message: str
    metrics: dict[str, Any] = Field(description="What the job reported, such as its loss history.")
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


class JobsPublic(BaseModel):
    """A page of jobs and how many match in all."""

    data: list[JobPublic]
    count: int


class JobEventPublic(BaseModel):
    """One event in a job's life (the `data:` of a server-sent event; its type is the `event:` name)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: int
    type: str
    data: dict[str, Any]
    created_at: datetime


class TrainJobCreate(BaseModel):
    """A training job for the worker: a knowledge extractor, compressor, reranker, reasoner or KM."""

    kind: TrainKind
    payload: JsonObject = Field(default_factory=dict, description="Options the trainer of this kind reads.")
    document_id: int | None = Field(None, ge=1, le=DB_INT_MAX, description="The document the job is about, if any.")
