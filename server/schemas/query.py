"""Schemas of POST /v1/query."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator


class RagOptions(BaseModel):
    """Retrieval ahead of generation: how many passages, and whether to rerank a larger pool."""

    top_k: int = Field(5, ge=1, le=50)
    rerank: bool = False


class QueryCreate(BaseModel):
    """A question about one document (through its KM) or any served model name."""

    document_id: int | None = Field(None, ge=1, description="Answer with this document's knowledge module.")
    km: str | None = Field(None, description="A model name instead: 'km:<id>', an alias, or the base model id.")
    question: str = Field(min_length=1, max_length=8000)
    ke: str | None = Field(None, min_length=1, max_length=200, description="A knowledge extractor to add.")
    rag: RagOptions | None = None
    compress: Literal["none", "extractive", "abstractive"] = "none"
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> QueryCreate:
        if (self.document_id is None) == (self.km is None):
            raise ValueError("give exactly one of document_id or km")
        return self

    def model_name(self) -> str:
        """The model name this query resolves (document -> its KM, plus the KE when named)."""
        base = f"km:{self.document_id}" if self.document_id is not None else str(self.km)
        return f"{base}+ke:{self.ke}" if self.ke else base


class UsagePublic(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class QueryPublic(BaseModel):
    """The answer and what produced it."""

    answer: str
    finish_reason: str
    adapters: dict[str, dict[str, Any] | None]
    passages: list[dict[str, Any]]
    usage: UsagePublic
    timings_ms: dict[str, float]
