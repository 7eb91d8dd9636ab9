"""OpenAI-compatible routes: `model` is the base model id, `km:<document_id>`, `km:<id>+ke:<name>` or an alias."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.deps import QueryPrincipal, StateDep
from server.routes.query import GenerationDep
from server.schemas.openai import ChatCompletionCreate, CompletionCreate, ModelsPublic
from server.services.openai_compat import OpenAIService
from server.sse import event_stream_response

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelsPublic)
def list_models(principal: QueryPrincipal, state: StateDep, generation: GenerationDep) -> ModelsPublic:
    """The models this key can name: the base model and every alias (documents' KMs are `km:<id>`)."""
    return OpenAIService(state, generation).models(principal)


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionCreate, principal: QueryPrincipal, state: StateDep, generation: GenerationDep
) -> Any:
    """Chat completion with the named model's adapters (stream=true: chunks as SSE, then [DONE])."""
    service = OpenAIService(state, generation)
    admission = await service.admit_chat(principal, body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream_response(service.stream_chat(admission, include_usage))
    return await service.chat(admission)


@router.post("/completions")
async def completions(
    body: CompletionCreate, principal: QueryPrincipal, state: StateDep, generation: GenerationDep
) -> Any:
    """Text completion; several prompts are generated together in one batch."""
    service = OpenAIService(state, generation)
    admissions = await service.admit_completions(principal, body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream_response(service.stream_completion(admissions[0], include_usage))
    return await service.completions(admissions, body)
