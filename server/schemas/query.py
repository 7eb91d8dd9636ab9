"""Schemas of POST /v1/query."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from server.schemas.common import DB_INT_MAX, RowId, Seed, Text, Unicode

KM_NAME = re.compile(r"^km:(\d{1,18})(?:\+|$)")  # 18 digits: every such id fits a 64-bit column
MSG_RAG_TARGET = "rag needs documents to search: give document_id, km 'km:<document_id>', or rag.document_ids."
MSG_COMPRESS_RAG = "compress works on retrieved passages: add rag (e.g. {\"top_k\": 5}) or send compress 'none'."


class RagOptions(BaseModel):
    """Retrieval ahead of generation: how many passages, from which documents, and whether to rerank."""

    top_k: int = Field(5, ge=1, le=50, description="Passages put in the prompt.")
    rerank: bool = Field(False, description="Rerank a larger pool with the reranker (KARD), keep the top_k.")
    pool: int = Field(20, ge=1, le=200, description="Passages retrieved for the reranker to choose from.")
    document_ids: list[RowId] | None = Field(
        None, min_length=1, max_length=100,
        description="Search across these documents instead of the queried one; all must be yours.",
    )


class QueryCreate(BaseModel):
    """A question about one document (through its KM) or any served model name."""

    document_id: int | None = Field(
        None, ge=1, le=DB_INT_MAX, description="Answer with this document's knowledge module.")
    km: Text | None = Field(
        None, max_length=1000, description="A model name instead: 'km:<id>', an alias, or the base model id.")
    question: Unicode = Field(min_length=1, max_length=8000)
    ke: Text | None = Field(None, min_length=1, max_length=200, description="A knowledge extractor to add.")
    rag: RagOptions | None = None
    reason: bool = Field(False, description="Answer with the reasoner (alias reasoner:default) over reranked passages.")
    compress: Literal["none", "extractive", "abstractive"] = "none"
    compress_k: int = Field(3, ge=1, le=20, description="Sentences the extractive compressor keeps.")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> QueryCreate:
        if (self.document_id is None) == (self.km is None):
            raise ValueError("give exactly one of document_id or km")
        if self.rag is not None and not self.rag_document_ids():
            raise ValueError(MSG_RAG_TARGET)
        if self.compress != "none" and self.rag is None:
            raise ValueError(MSG_COMPRESS_RAG)
        return self

    def rag_document_ids(self) -> list[int]:
        """The documents retrieval searches: rag.document_ids, else the queried document (or its `km:<id>`)."""
        if self.rag is not None and self.rag.document_ids:
            return list(dict.fromkeys(self.rag.document_ids))
        if self.document_id is not None:
            return [self.document_id]
        match = KM_NAME.match(self.km or "")
        return [int(match.group(1))] if match else []

    def model_name(self) -> str:
        """The model name this query resolves (document -> its KM, plus the KE when named)."""
        base = f"km:{self.document_id}" if self.document_id is not None else str(self.km)
        return f"{base}+ke:{self.ke}" if self.ke else base


class UsagePublic(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int = Field(description="Tokens of the prompt the generator read (after compression, if any).")
    completion_tokens: int
    total_tokens: int
    prompt_tokens_uncompressed: int | None = Field(
        None, description="Prompt tokens with the retrieved passages uncompressed (the generator's tokenizer); "
                          "null when the query asked for no compression.")


class PassagePublic(BaseModel):
    """A retrieved chunk: its document, position in the document, text and similarity to the question."""

    document_id: int
    index: int
    text: str
    score: float


class QueryPublic(BaseModel):
    """The answer and what produced it."""

    answer: str
    finish_reason: str
    adapters: dict[str, dict[str, Any] | None]
    passages: list[PassagePublic] = Field(description="Retrieved passages in prompt order: the best one last.")
    compressed: str | None = Field(
        None, description="The compressed text the prompt used instead of the passages ('' = none: closed-book).")
    usage: UsagePublic
    timings_ms: dict[str, float]
