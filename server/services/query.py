"""The query pipeline: (retrieve -> rerank -> compress, with the retrieval issue) -> generate with KM/KE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from engines.base import ChatMessage, SamplingParams, StreamChunk
from registry.errors import RegistryError
from server.auth import Principal
from server.schemas.query import QueryCreate, QueryPublic, UsagePublic
from server.services.generation import Admission, GenerationService
from server.sse import format_event as sse

# The closed-book prompt of the knowledge-module paper's evaluation.
CLOSED_BOOK_PROMPT = (
    "Answer the following question. Give only the answer, and no extra commentary, formatting, or chattiness. "
    "Question: {question}"
)
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


class QueryService:
    """Answers questions about documents through their knowledge modules."""

    def __init__(self, generation: GenerationService) -> None:
        self._generation = generation

    async def admit(self, principal: Principal, body: QueryCreate) -> Admission:
        """Check the stages asked for and admit the request (adapter versions fixed here)."""
        if body.rag is not None:
            raise StageUnavailableError("retrieval", "rag")
        if body.compress != "none":
            raise StageUnavailableError("compression", "compress")
        sampling = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed)
        return await self._generation.admit(principal, body.model_name(), sampling,
                                            messages=closed_book_messages(body.question))

    async def answer(self, admission: Admission) -> QueryPublic:
        """Generate the whole answer."""
        start = time.perf_counter()
        (result,) = await self._generation.run([admission])
        admission.timings_ms["total"] = round((time.perf_counter() - start) * 1000 + _admit_ms(admission), 3)
        usage = UsagePublic(prompt_tokens=result.usage.prompt_tokens,
                            completion_tokens=result.usage.completion_tokens, total_tokens=result.usage.total_tokens)
        return QueryPublic(answer=result.text.strip(), finish_reason=result.finish_reason,
                           adapters=admission.adapters_public(), passages=[], usage=usage,
                           timings_ms=admission.timings_ms)

    async def stream(self, admission: Admission) -> AsyncIterator[str]:
        """Server-sent events: `delta` events with text, then one `done` event with the full response."""
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
                    yield sse(_done(admission, "".join(parts), chunk).model_dump(), event="done")
        except RegistryError as exc:
            yield sse({"error": {"code": exc.code, "message": exc.message}}, event="error")


def _done(admission: Admission, text: str, chunk: StreamChunk) -> QueryPublic:
    usage = chunk.usage
    assert usage is not None
    return QueryPublic(
        answer=text.strip(), finish_reason=chunk.finish_reason or "stop", adapters=admission.adapters_public(),
        passages=[], usage=UsagePublic(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                       total_tokens=usage.total_tokens),
        timings_ms=admission.timings_ms,
    )


def _admit_ms(admission: Admission) -> float:
    return admission.timings_ms.get("resolve", 0.0) + admission.timings_ms.get("adapter", 0.0)


