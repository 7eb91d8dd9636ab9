"""Admission and generation shared by /v1/query and the OpenAI routes.

Admission resolves the model name to adapter versions ONCE (the hot-swap point): a request in flight keeps the
version it was admitted with, and the next request after an alias move gets the new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from engines.base import ChatMessage, GenerationRequest, GenerationResult, SamplingParams, StreamChunk, Usage
from engines.errors import ContextLengthError
from registry.errors import RegistryError
from server.auth import Principal
from server.limits import current_deadline, next_before
from server.metrics import ServerMetrics
from server.services.adapters import AdapterService
from server.services.resolver import AdapterRef, Resolution, resolve_model
from server.state import AppState

MSG_MAX_TOKENS = "max_tokens {value} is above this server's limit of {limit}; ask for fewer tokens."
MSG_PROMPT_TOO_LONG = (
    "the prompt has {tokens} tokens, above this server's limit of {limit} (KMSERVE_MAX_PROMPT_TOKENS); shorten it."
)


class MaxTokensError(RegistryError):
    """A request asked for more output tokens than the server allows."""

    code = "max_tokens_too_large"
    status = 422

    def __init__(self, value: int, limit: int) -> None:
        super().__init__(MSG_MAX_TOKENS.format(value=value, limit=limit))


class PromptTooLongError(RegistryError):
    """A prompt is longer than the server's prompt-token limit."""

    code = "prompt_too_long"
    status = 400

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(MSG_PROMPT_TOO_LONG.format(tokens=tokens, limit=limit), tokens=tokens, limit=limit)


@dataclass
class Admission:
    """A request admitted with the adapter versions it will run on, and the event-loop time it must end by."""

    model: str
    resolution: Resolution
    served: AdapterRef | None
    request: GenerationRequest
    timings_ms: dict[str, float] = field(default_factory=dict)
    deadline: float | None = None

    def adapters_public(self) -> dict[str, dict[str, object] | None]:
        """The versions used, by role: {"km": {"id", "name", "version"} | None, "ke": ...}."""
        res = self.resolution
        km = res.km or (res.alias if res.alias and res.alias.kind == "km" else None)
        ke = res.ke or (res.alias if res.alias and res.alias.kind == "ke" else None)
        out: dict[str, dict[str, object] | None] = {"km": _ref_public(km), "ke": _ref_public(ke)}
        if res.alias is not None and res.alias.kind not in ("km", "ke"):
            out[res.alias.kind] = _ref_public(res.alias)
        return out


def _ref_public(ref: AdapterRef | None) -> dict[str, object] | None:
    return None if ref is None else {"id": ref.id, "name": ref.lineage, "version": ref.version}


class GenerationService:
    """Admits requests (resolve + verified adapter handle) and runs them on the engine, counting tokens."""

    def __init__(self, state: AppState, adapters: AdapterService, metrics: ServerMetrics) -> None:
        self._state = state
        self._adapters = adapters
        self._metrics = metrics

    async def admit(
        self, principal: Principal, model: str, sampling: SamplingParams, *, prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
    ) -> Admission:
        """Check the token limits, resolve `model` now and build the engine request (with a verified adapter)."""
        limit = self._state.settings.max_request_tokens
        if sampling.max_tokens > limit:
            raise MaxTokensError(sampling.max_tokens, limit)
        request = GenerationRequest(prompt=prompt, messages=tuple(messages) if messages else None, sampling=sampling)
        await asyncio.to_thread(self._check_prompt, request)
        start = time.perf_counter()
        resolution = await asyncio.to_thread(self._resolve, principal.tenant, model)
        resolved = time.perf_counter()
        handle, served = await self._adapters.handle_for(resolution)
        request = dataclasses.replace(request, adapter=handle)
        timings = {"resolve": _ms(start, resolved), "adapter": _ms(resolved, time.perf_counter())}
        return Admission(model, resolution, served, request, timings, self._deadline())

    def _check_prompt(self, request: GenerationRequest) -> None:
        """Refuse, before any work, a prompt over the prompt limit or one that leaves no room for max_tokens.

        The engine would refuse the second too, but only once a stream had started (a 200 with an error event).
        """
        from engines.hf_loading import encode_request

        generator = self._state.require_generator()
        tokens = len(encode_request(generator.tokenizer, request))
        limit = self._state.settings.max_prompt_tokens
        if limit and tokens > limit:
            raise PromptTooLongError(tokens, limit)
        context = generator.context_limit
        if context is not None and tokens + request.sampling.max_tokens > context:
            raise ContextLengthError(tokens, request.sampling.max_tokens, context)

    def _deadline(self) -> float | None:
        """The request's deadline: the one the limits middleware set, else the timeout from now (0 = none)."""
        deadline = current_deadline()
        timeout = self._state.settings.request_timeout_seconds
        if deadline is None and timeout > 0:
            deadline = asyncio.get_running_loop().time() + timeout
        return deadline

    def _resolve(self, tenant: str, model: str) -> Resolution:
        with self._state.sessions() as session:
            return resolve_model(session, model, tenant=tenant, base_model_id=self._state.base_model_id)

    async def run(self, admissions: Sequence[Admission]) -> list[GenerationResult]:
        """Generate for admitted requests together (the engine batches them)."""
        start = time.perf_counter()
        results = await self._state.require_generator().generate([a.request for a in admissions])
        elapsed = _ms(start, time.perf_counter())
        for admission, result in zip(admissions, results, strict=True):
            admission.timings_ms["generate"] = elapsed
            self.count(result.usage)
        return results

    async def stream(self, admission: Admission) -> AsyncIterator[StreamChunk]:
        """Text deltas of one admitted request; the last chunk has finish_reason and usage.

        RequestTimeoutError once the request's deadline passes, its engine request aborted (batch slot freed).
        """
        start = time.perf_counter()
        timeout = self._state.settings.request_timeout_seconds
        async with aclosing(self._state.require_generator().stream(admission.request)) as chunks:
            while True:
                try:
                    chunk = await next_before(chunks, admission.deadline, timeout)
                except StopAsyncIteration:
                    return
                if chunk.final and chunk.usage is not None:
                    admission.timings_ms["generate"] = _ms(start, time.perf_counter())
                    self.count(chunk.usage)
                yield chunk

    def count(self, usage: Usage) -> None:
        """Add a request's tokens to the Prometheus counters."""
        self._metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self._metrics.tokens.labels("completion").inc(usage.completion_tokens)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)
