"""POST /v1/query: a question answered through a document's knowledge module."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.deps import AdapterServiceDep, QueryPrincipal, RetrievalDep, StateDep
from server.schemas.query import QueryCreate, QueryPublic
from server.services.compress import CompressService
from server.services.generation import GenerationService
from server.services.query import QueryService
from server.services.rerank import RerankService
from server.sse import event_stream_response

router = APIRouter(prefix="/v1", tags=["query"])


def get_generation(request: Request) -> GenerationService:
    """The shared generation service."""
    service: GenerationService = request.app.state.generation
    return service


GenerationDep = Annotated[GenerationService, Depends(get_generation)]


@router.post("/query", response_model=QueryPublic,
             responses={200: {"content": {"text/event-stream": {}}, "description": "SSE when stream=true"}})
async def query(
    body: QueryCreate, principal: QueryPrincipal, generation: GenerationDep, retrieval: RetrievalDep,
    state: StateDep, adapters: AdapterServiceDep,
) -> QueryPublic | StreamingResponse:
    """Answer a question about a document through its knowledge module, optionally with retrieved passages."""
    service = QueryService(generation, retrieval, CompressService(state, adapters), RerankService(state))
    admission = await service.admit(principal, body)
    if body.stream:
        return event_stream_response(service.stream(admission))
    return await service.answer(admission)
