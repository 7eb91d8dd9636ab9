"""Admission and generation shared by /v1/query and the OpenAI routes.

Admission resolves the model name to adapter versions ONCE (the hot-swap point): a request in flight keeps the
version it was admitted with, and the next request after an alias move gets the new one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from engines.base import ChatMessage, GenerationRequest, GenerationResult, SamplingParams, StreamChunk, Usage
from registry.errors import RegistryError
from server.auth import Principal
from server.metrics import ServerMetrics
from server.services.adapters import AdapterService
from server.services.resolver import AdapterRef, Resolution, resolve_model
from server.state import AppState

MSG_MAX_TOKENS = "max_tokens {value} is above this server's limit of {limit}; ask for fewer tokens."


class MaxTokensError(RegistryError):
    """A request asked for more output tokens than the server allows."""

    code = "max_tokens_too_large"
    status = 422

    def __init__(self, value: int, limit: int) -> None:
        super().__init__(MSG_MAX_TOKENS.format(value=value, limit=limit))


@dataclass
class Admission:
    """A request admitted with the adapter versions it will run on."""

    model: str
    resolution: Resolution
    served: AdapterRef | None
    request: GenerationRequest
    timings_ms: dict[str, float] = field(default_factory=dict)

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
        """Resolve `model` now and build the engine request (with a verified adapter handle)."""
        limit = self._state.settings.max_request_tokens
        if sampling.max_tokens > limit:
            raise MaxTokensError(sampling.max_tokens, limit)
        start = time.perf_counter()
        resolution = await asyncio.to_thread(self._resolve, principal.tenant, model)
        resolved = time.perf_counter()
        handle, served = await self._adapters.handle_for(resolution)
        request = GenerationRequest(prompt=prompt, messages=tuple(messages) if messages else None,
                                    adapter=handle, sampling=sampling)
        timings = {"resolve": _ms(start, resolved), "adapter": _ms(resolved, time.perf_counter())}
        return Admission(model, resolution, served, request, timings)

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
        """Text deltas of one admitted request; the last chunk has finish_reason and usage."""
        start = time.perf_counter()
        async for chunk in self._state.require_generator().stream(admission.request):
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
