"""OpenAI-compatible chat completions, completions and model listing on top of the generation service."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from sqlalchemy import select

from engines.base import ChatMessage, SamplingParams, ScoreRequest, StreamChunk, Usage
from registry.errors import RegistryError
from registry.models import Alias
from server.auth import Principal
from server.schemas.openai import (
    ChatCompletionCreate,
    ChatMessageIn,
    CompletionCreate,
    ModelPublic,
    ModelsPublic,
    _SamplingFields,
    chat_completion,
    legacy_logprobs,
    usage_dict,
)
from server.services.generation import Admission, GenerationService
from server.sse import format_event
from server.state import AppState

MSG_UNSUPPORTED = "{field} is not supported by this server: {detail}"
MSG_ECHO_STREAM = "the prompt is echoed only without stream"
MSG_LOGPROBS_GENERATED = (
    "log-probabilities are served for the prompt only; score it with echo=true and max_tokens=0"
)
MSG_SCORE_NEEDS_ECHO = "0 is served only to score the prompt; send echo=true with it (and logprobs for the scores)"
ChunkBuilder = Callable[[str | None, str | None], dict[str, Any]]
ChoicesAndUsage = tuple[list[dict[str, Any]], dict[str, int]]


class UnsupportedParameterError(RegistryError):
    """An OpenAI parameter kmserve does not serve."""

    code = "unsupported_parameter"
    status = 400

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(MSG_UNSUPPORTED.format(field=field, detail=detail), param=field)


def sampling_of(body: _SamplingFields, max_tokens: int) -> SamplingParams:
    """Engine sampling params from an OpenAI request (n > 1 refused)."""
    if body.n != 1:
        raise UnsupportedParameterError("n", "ask for one choice per request")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          stop=body.stop_list())


def to_messages(messages: list[ChatMessageIn]) -> list[ChatMessage]:
    """Chat turns for the engine: text parts joined; `developer` treated as `system`."""
    out = []
    for message in messages:
        content = message.content
        if not isinstance(content, str):
            if any(part.type != "text" for part in content):
                raise UnsupportedParameterError("messages", "only text content parts are served")
            content = "".join(part.text or "" for part in content)
        out.append(ChatMessage(role="system" if message.role == "developer" else message.role, content=content))
    return out


class OpenAIService:
    """The OpenAI routes' work."""

    def __init__(self, state: AppState, generation: GenerationService) -> None:
        self._state = state
        self._generation = generation

    def models(self, principal: Principal) -> ModelsPublic:
        """The base model, then every alias of the tenant (a document's KM is alias `km:<id>`)."""
        now = int(time.time())
        data = [ModelPublic(id=self._state.base_model_id, created=now, owned_by="kmserve")]
        with self._state.sessions() as session:
            names = session.scalars(select(Alias.name).where(Alias.tenant == principal.tenant).order_by(Alias.name))
            data += [ModelPublic(id=name, created=now, owned_by=principal.tenant) for name in names]
        return ModelsPublic(data=data)

    async def admit_chat(self, principal: Principal, body: ChatCompletionCreate) -> Admission:
        """Resolve the model and admit a chat request."""
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return await self._generation.admit(principal, body.model, sampling_of(body, max_tokens),
                                            messages=to_messages(body.messages))

    async def chat(self, admission: Admission) -> dict[str, Any]:
        """A complete chat.completion."""
        (result,) = await self._generation.run([admission])
        usage = usage_dict(result.usage.prompt_tokens, result.usage.completion_tokens)
        return chat_completion(_id("chatcmpl"), int(time.time()), admission.model, result.text, result.finish_reason,
                               usage, {"kmserve": {"adapters": admission.adapters_public()}})

    async def admit_completions(self, principal: Principal, body: CompletionCreate) -> list[Admission]:
        """Admit one request per prompt (they are generated together, in one batch)."""
        check_echo(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or (body.stream and len(prompts) != 1):
            raise UnsupportedParameterError("prompt", "give one prompt (several only without stream)")
        # Scoring (max_tokens=0) generates nothing, but admission still resolves the model to its adapters.
        sampling = sampling_of(body, max(body.max_tokens, 1))
        return [await self._generation.admit(principal, body.model, sampling, prompt=p) for p in prompts]

    async def completions(self, admissions: list[Admission], body: CompletionCreate) -> dict[str, Any]:
        """A text_completion with one choice per prompt (max_tokens=0: the scored prompt itself)."""
        if body.max_tokens == 0:
            choices, usage = await self._score(admissions, body.logprobs)
        else:
            choices, usage = await self._generate(admissions, echo=body.echo)
        return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": admissions[0].model, "choices": choices, "usage": usage,
                "kmserve": {"adapters": admissions[0].adapters_public()}}

    async def _generate(self, admissions: list[Admission], *, echo: bool) -> ChoicesAndUsage:
        results = await self._generation.run(admissions)
        choices = [{"index": i, "text": (_prompt(a) if echo else "") + r.text, "finish_reason": r.finish_reason,
                    "logprobs": None} for i, (a, r) in enumerate(zip(admissions, results, strict=True))]
        return choices, _usage(r.usage for r in results)

    async def _score(self, admissions: list[Admission], logprobs: int | None) -> ChoicesAndUsage:
        """Each prompt scored in one forward pass with its admitted adapter; nothing is generated."""
        engine = self._state.require_generator()
        requests = [ScoreRequest(_prompt(a), adapter=a.request.adapter, top_logprobs=logprobs or 0)
                    for a in admissions]
        results = await asyncio.gather(*(engine.score(r) for r in requests))
        for result in results:
            self._generation.count(result.usage)
        choices = [{"index": i, "text": r.prompt, "finish_reason": "length",
                    "logprobs": None if logprobs is None else legacy_logprobs(result.tokens)}
                   for i, (r, result) in enumerate(zip(requests, results, strict=True))]
        return choices, _usage(r.usage for r in results)

    def stream_chat(self, admission: Admission, include_usage: bool) -> AsyncIterator[str]:
        """chat.completion.chunk events, the first carrying the assistant role, then `[DONE]`."""
        cid, created = _id("chatcmpl"), int(time.time())

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            body: dict[str, Any] = {} if delta is None else {"content": delta}
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": admission.model,
                    "choices": [{"index": 0, "delta": body, "finish_reason": finish, "logprobs": None}]}

        first = {**chunk(None, None)}
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return self._stream(admission, chunk, include_usage, first)

    def stream_completion(self, admission: Admission, include_usage: bool) -> AsyncIterator[str]:
        """text_completion chunks, then `[DONE]`."""
        cid, created = _id("cmpl"), int(time.time())

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": admission.model,
                    "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}

        return self._stream(admission, chunk, include_usage, None)

    async def _stream(self, admission: Admission, chunk: ChunkBuilder, include_usage: bool,
                      first: dict[str, Any] | None) -> AsyncIterator[str]:
        if first is not None:
            yield format_event(first)
        try:
            async for part in self._generation.stream(admission):
                for event in _events(part, chunk, include_usage):
                    yield event
        except RegistryError as exc:
            yield format_event({"error": {"code": exc.code, "message": exc.message}})
        yield "data: [DONE]\n\n"


def check_echo(body: CompletionCreate) -> None:
    """Refuse the echo/logprobs/max_tokens combinations that are not served (400 naming the parameter)."""
    if body.echo and body.stream:
        raise UnsupportedParameterError("echo", MSG_ECHO_STREAM)
    if body.logprobs is not None and body.max_tokens > 0:
        raise UnsupportedParameterError("logprobs", MSG_LOGPROBS_GENERATED)
    if body.max_tokens == 0 and not body.echo:
        raise UnsupportedParameterError("max_tokens", MSG_SCORE_NEEDS_ECHO)


def _prompt(admission: Admission) -> str:
    return admission.request.prompt or ""


def _usage(usages: Iterable[Usage]) -> dict[str, int]:
    items = list(usages)
    return usage_dict(sum(u.prompt_tokens for u in items), sum(u.completion_tokens for u in items))


def _events(part: StreamChunk, chunk: ChunkBuilder, include_usage: bool) -> list[str]:
    events = [format_event(chunk(part.delta, None))] if part.delta else []
    if part.final:
        events.append(format_event(chunk(None, part.finish_reason)))
        if include_usage and part.usage is not None:
            events.append(format_event({**chunk(None, None), "choices": [],
                                 "usage": usage_dict(part.usage.prompt_tokens, part.usage.completion_tokens)}))
    return events


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
