"""The query pipeline: retrieve -> rerank -> compress -> generate with KM/KE, or reason with the reasoner (KARD)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engines.base import ChatMessage, SamplingParams, StreamChunk, Usage
from engines.prompts import reader_prompt
from engines.reasoning import REASONER_ALIAS, reasoner_prompt
from registry.errors import RegistryError
from server.auth import Principal
from server.schemas.query import PassagePublic, QueryCreate, QueryPublic, RagOptions, UsagePublic
from server.services.compress import Compression, CompressService
from server.services.generation import Admission, GenerationService
from server.services.rerank import ReasonerUnavailableError, Reranking, RerankService, reasoned_answer
from server.services.resolver import InvalidModelError
from server.services.retrieval import RetrievalService
from server.sse import format_event as sse

if TYPE_CHECKING:
    from registry.vector_layout import Passage

MSG_STAGE = "the {stage} stage is not available on this server yet; send the query without '{field}'."


class StageUnavailableError(RegistryError):
    """A pipeline stage the request asked for is not available."""

    code = "stage_unavailable"
    status = 400

    def __init__(self, stage: str, field: str) -> None:
        super().__init__(MSG_STAGE.format(stage=stage, field=field), stage=stage)


def closed_book_messages(question: str) -> list[ChatMessage]:
    """The question in the paper's closed-book prompt, as one user turn."""
    return [ChatMessage(role="user", content=reader_prompt(question))]


def _messages(question: str, passages: Sequence[Passage], compression: Compression | None) -> list[ChatMessage]:
    # No passages (a document not indexed yet), or a compressor that judged them unhelpful: closed-book.
    texts = [p.text for p in passages] if compression is None else [compression.text] if compression.text else []
    return _rag_prompt(question, texts) if texts else closed_book_messages(question)


def rag_messages(question: str, passages: Sequence[Passage]) -> list[ChatMessage]:
    """The passages, in the order given, numbered ahead of the closed-book prompt, as one user turn."""
    return _rag_prompt(question, [p.text for p in passages])


def _rag_prompt(question: str, texts: Sequence[str]) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=reader_prompt(question, texts))]


@dataclass
class QueryAdmission:
    """An admitted query and the passages in its prompt (best last)."""

    admission: Admission
    passages: list[Passage]
    compression: Compression | None = None
    reranking: Reranking | None = None
    reason: bool = False

    @property
    def compressed(self) -> str | None:
        """The text that replaced the passages ("" = answered closed-book), or None without compression."""
        return self.compression.text if self.compression is not None else None

    def adapters_public(self) -> dict[str, dict[str, object] | None]:
        """The adapter versions used, the compressor's included when one ran."""
        out = self.admission.adapters_public()
        ref = self.compression.compressor if self.compression is not None else None
        if ref is not None:
            out["compressor"] = {"id": ref.id, "name": ref.lineage, "version": ref.version}
        if self.reranking is not None and self.reranking.reranker is not None:
            out["reranker"] = self.reranking.adapter_public()
        return out


class QueryService:
    """Answers questions about documents through their knowledge modules, optionally with retrieved passages."""

    def __init__(self, generation: GenerationService, retrieval: RetrievalService,
                 compress: CompressService | None = None, rerank: RerankService | None = None) -> None:
        self._generation = generation
        self._retrieval = retrieval
        self._compress = compress
        self._rerank = rerank

    async def admit(self, principal: Principal, body: QueryCreate) -> QueryAdmission:
        """Check the stages asked for, retrieve, and admit the request (adapter versions fixed here)."""
        start = time.perf_counter()
        passages, reranking = await self._passages(principal.tenant, body)
        retrieve_ms = round((time.perf_counter() - start) * 1000 - (reranking.ms if reranking else 0.0), 3)
        compression = await self._compressed(principal.tenant, body, passages)
        messages = _messages(body.question, passages, compression)
        sampling = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed)
        if body.reason:
            messages = [ChatMessage(role="user", content=reasoner_prompt(body.question, [p.text for p in passages]))]
        admission = await self._admit(principal, body, sampling, messages)
        if _rag_options(body) is not None:
            admission.timings_ms["retrieve"] = retrieve_ms
        if reranking is not None:
            admission.timings_ms["rerank"] = reranking.ms
        if compression is not None:
            admission.timings_ms["compress"] = compression.ms
        return QueryAdmission(admission, passages, compression, reranking, body.reason)

    async def _admit(self, principal: Principal, body: QueryCreate, sampling: SamplingParams,
                     messages: list[ChatMessage]) -> Admission:
        if not body.reason:
            return await self._generation.admit(principal, body.model_name(), sampling, messages=messages)
        try:
            return await self._generation.admit(principal, REASONER_ALIAS, sampling, messages=messages)
        except InvalidModelError as exc:
            raise ReasonerUnavailableError() from exc

    async def _compressed(self, tenant: str, body: QueryCreate, passages: list[Passage]) -> Compression | None:
        if body.compress == "none" or not passages:
            return None
        if self._compress is None:
            raise StageUnavailableError("compression", "compress")
        return await self._compress.compress(tenant, body.compress, body.question, passages, body.compress_k)

    async def _passages(self, tenant: str, body: QueryCreate) -> tuple[list[Passage], Reranking | None]:
        rag = _rag_options(body)
        if rag is None:
            return [], None
        count = max(rag.pool, rag.top_k) if rag.rerank else rag.top_k
        best_first = await self._retrieval.retrieve(tenant, body.rag_document_ids(), body.question, count)
        reranking = await self._reranked(tenant, body.question, best_first, rag) if rag.rerank else None
        kept = reranking.passages if reranking is not None else best_first
        # Best passage last, nearest the question: the knowledge-module paper's RAG setting.
        return kept[::-1], reranking

    async def _reranked(self, tenant: str, question: str, pool: list[Passage], rag: RagOptions) -> Reranking:
        if self._rerank is None:
            raise StageUnavailableError("reranking", "rag.rerank")
        return await self._rerank.rerank(tenant, question, pool, rag.top_k)

    async def answer(self, query: QueryAdmission) -> QueryPublic:
        """Generate the whole answer."""
        admission = query.admission
        start = time.perf_counter()
        (result,) = await self._generation.run([admission])
        admission.timings_ms["total"] = round((time.perf_counter() - start) * 1000 + _admit_ms(admission), 3)
        return QueryPublic(answer=_final(query, result.text), finish_reason=result.finish_reason,
                           adapters=query.adapters_public(), passages=_passages_public(query.passages),
                           compressed=query.compressed, usage=_usage(query, result.usage),
                           timings_ms=admission.timings_ms)

    async def stream(self, query: QueryAdmission) -> AsyncIterator[str]:
        """Server-sent events: `delta` events with text, then one `done` event with the full response."""
        admission = query.admission
        start = time.perf_counter()
        parts: list[str] = []
        try:
            async for chunk in self._generation.stream(admission):
                parts.append(chunk.delta)
                if chunk.delta:
                    yield sse({"delta": chunk.delta}, event="delta")
                if chunk.final:
                    admission.timings_ms["total"] = round((time.perf_counter() - start) * 1000
                                                          + _admit_ms(admission), 3)
                    yield sse(_done(query, "".join(parts), chunk).model_dump(), event="done")
        except RegistryError as exc:
            yield sse({"error": {"code": exc.code, "message": exc.message}}, event="error")


def _rag_options(body: QueryCreate) -> RagOptions | None:
    # The reasoner always reads reranked passages (KARD); without `rag` it gets the defaults with reranking on.
    if body.rag is None and body.reason and body.rag_document_ids():
        return RagOptions(rerank=True)
    return body.rag


def _final(query: QueryAdmission, text: str) -> str:
    return reasoned_answer(text) if query.reason else text.strip()


def _passages_public(passages: Sequence[Passage]) -> list[PassagePublic]:
    return [PassagePublic(document_id=p.document_id, index=p.index, text=p.text, score=p.score) for p in passages]


def _done(query: QueryAdmission, text: str, chunk: StreamChunk) -> QueryPublic:
    admission, usage = query.admission, chunk.usage
    assert usage is not None
    return QueryPublic(
        answer=_final(query, text), finish_reason=chunk.finish_reason or "stop", adapters=query.adapters_public(),
        passages=_passages_public(query.passages), compressed=query.compressed,
        usage=_usage(query, usage), timings_ms=admission.timings_ms,
    )


def _usage(query: QueryAdmission, usage: Usage) -> UsagePublic:
    uncompressed = query.compression.uncompressed_tokens if query.compression is not None else None
    return UsagePublic(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       total_tokens=usage.total_tokens, prompt_tokens_uncompressed=uncompressed)


def _admit_ms(admission: Admission) -> float:
    return sum(admission.timings_ms.get(stage, 0.0) for stage in ("retrieve", "compress", "resolve", "adapter"))
