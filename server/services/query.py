"""The query pipeline: retrieve -> (rerank -> compress, not yet available) -> generate with KM/KE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engines.base import ChatMessage, SamplingParams, StreamChunk
from registry.errors import RegistryError
from server.auth import Principal
from server.schemas.query import PassagePublic, QueryCreate, QueryPublic, UsagePublic
from server.services.generation import Admission, GenerationService
from server.services.retrieval import RetrievalService
from server.sse import format_event as sse

if TYPE_CHECKING:
    from registry.vector_layout import Passage

# The closed-book prompt of the knowledge-module paper's evaluation.
CLOSED_BOOK_PROMPT = (
    "Answer the following question. Give only the answer, and no extra commentary, formatting, or chattiness. "
    "Question: {question}"
)
RAG_PREAMBLE = "Consider the following passages:\n"
PASSAGE_LINE = "Passage {number}: {text}\n"
MSG_STAGE = "the {stage} stage is not available on this server yet; send the query without '{field}'."


class StageUnavailableError(RegistryError):
    """A pipeline stage the request asked for is not available."""

    code = "stage_unavailable"
    status = 400

    def __init__(self, stage: str, field: str) -> None:
        super().__init__(MSG_STAGE.format(stage=stage, field=field), stage=stage)


def closed_book_messages(question: str) -> list[ChatMessage]:
    """The question in the paper's closed-book prompt, as one user turn."""
    return [ChatMessage(role="user", content=CLOSED_BOOK_PROMPT.format(question=question))]


def rag_messages(question: str, passages: Sequence[Passage]) -> list[ChatMessage]:
    """The passages, in the order given, numbered ahead of the closed-book prompt, as one user turn."""
    lines = "".join(PASSAGE_LINE.format(number=n, text=p.text) for n, p in enumerate(passages, start=1))
    return [ChatMessage(role="user", content=RAG_PREAMBLE + lines + CLOSED_BOOK_PROMPT.format(question=question))]


@dataclass
class QueryAdmission:
    """An admitted query and the passages in its prompt (best last)."""

    admission: Admission
    passages: list[Passage]


class QueryService:
    """Answers questions about documents through their knowledge modules, optionally with retrieved passages."""

    def __init__(self, generation: GenerationService, retrieval: RetrievalService) -> None:
        self._generation = generation
        self._retrieval = retrieval

    async def admit(self, principal: Principal, body: QueryCreate) -> QueryAdmission:
        """Check the stages asked for, retrieve, and admit the request (adapter versions fixed here)."""
        _check_stages(body)
        start = time.perf_counter()
        passages = await self._passages(principal.tenant, body)
        retrieve_ms = round((time.perf_counter() - start) * 1000, 3)
        # No passages (a document not indexed yet): the plain closed-book prompt rather than an empty list.
        messages = rag_messages(body.question, passages) if passages else closed_book_messages(body.question)
        sampling = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed)
        admission = await self._generation.admit(principal, body.model_name(), sampling, messages=messages)
        if body.rag is not None:
            admission.timings_ms["retrieve"] = retrieve_ms
        return QueryAdmission(admission, passages)

    async def _passages(self, tenant: str, body: QueryCreate) -> list[Passage]:
        if body.rag is None:
            return []
        best_first = await self._retrieval.retrieve(tenant, body.rag_document_ids(), body.question, body.rag.top_k)
        # Best passage last, nearest the question: the knowledge-module paper's RAG setting.
        return best_first[::-1]

    async def answer(self, query: QueryAdmission) -> QueryPublic:
        """Generate the whole answer."""
        admission = query.admission
        start = time.perf_counter()
        (result,) = await self._generation.run([admission])
        admission.timings_ms["total"] = round((time.perf_counter() - start) * 1000 + _admit_ms(admission), 3)
        usage = UsagePublic(prompt_tokens=result.usage.prompt_tokens,
                            completion_tokens=result.usage.completion_tokens, total_tokens=result.usage.total_tokens)
        return QueryPublic(answer=result.text.strip(), finish_reason=result.finish_reason,
                           adapters=admission.adapters_public(), passages=_passages_public(query.passages),
                           usage=usage, timings_ms=admission.timings_ms)

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


def _check_stages(body: QueryCreate) -> None:
    if body.rag is not None and body.rag.rerank:
        raise StageUnavailableError("reranking", "rag.rerank")
    if body.compress != "none":
        raise StageUnavailableError("compression", "compress")


def _passages_public(passages: Sequence[Passage]) -> list[PassagePublic]:
    return [PassagePublic(document_id=p.document_id, index=p.index, text=p.text, score=p.score) for p in passages]


def _done(query: QueryAdmission, text: str, chunk: StreamChunk) -> QueryPublic:
    admission, usage = query.admission, chunk.usage
    assert usage is not None
    return QueryPublic(
        answer=text.strip(), finish_reason=chunk.finish_reason or "stop", adapters=admission.adapters_public(),
        passages=_passages_public(query.passages),
        usage=UsagePublic(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                          total_tokens=usage.total_tokens),
        timings_ms=admission.timings_ms,
    )


def _admit_ms(admission: Admission) -> float:
    return sum(admission.timings_ms.get(stage, 0.0) for stage in ("retrieve", "resolve", "adapter"))
