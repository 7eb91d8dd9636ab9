"""The vLLM engine (GPU only; `pip install '.[gpu]'`, vllm==0.24.0) behind the same interface as the HF engine.

vLLM is imported lazily (constructor and builder only), so this module imports on any machine. The `AsyncLLM`
client is injected through the constructor; `from_model` builds the real one with LoRA enabled.

Adapters: a `LoRARequest` is named and numbered by the registry primary key (`lora_int_id=handle.id`), which is
stable across processes and replicas, never `hash()` (salted per process). Preloading and pinning go through the
engine client (`add_lora`, `pin_lora`, `remove_lora`), not vLLM's dev-only HTTP loading endpoints. The shared
`AdapterCache` keeps the LRU with capacity `max_cpu_loras`, so vLLM's own CPU LRU never evicts behind our back
and the counters stay true. Facts about vLLM LoRA behaviour that shape this code:
- `pin_lora` pins the adapter in the CPU cache AND in a GPU slot for good; with `max_loras` GPU slots all pinned
  vLLM cannot activate any other adapter ("No free lora slots"), so at most `max_loras - 1` may be pinned here.
- there is no `unpin`; an unpinned adapter stays pinned inside vLLM (holding its GPU slot) until it is removed,
  which happens on its next LRU eviction or unload here. Such adapters still count against the pin limit.
- `max_lora_rank` must be one of vLLM's supported ranks; 32 fits a KM (16) concatenated with a KE (16).
- Prompts are tokenized here (same tokenizer and chat template as the HF engine) and sent as token ids, so the
  two engines see identical prompts and vLLM does not add a second BOS to a rendered chat.
- Prompt scoring asks for `prompt_logprobs` (computed from the raw logits) with max_tokens=1, since vLLM cannot
  generate nothing; the one generated token is dropped. Offsets and token texts come from our tokenizer.
- GPU.md: set VLLM_USE_FLASHINFER_SAMPLER=0 where flashinfer is absent; tiny test models use head_dim 64.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

from engines.adapter_cache import AdapterCache
from engines.base import (
    AdapterHandle,
    Engine,
    EngineConfig,
    EngineStats,
    GenerationRequest,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    StreamChunk,
    Usage,
)
from engines.errors import (
    AdapterLoadError,
    ContextLengthError,
    EngineClosedError,
    EngineUnavailableError,
    GenerationFailedError,
    InvalidRequestError,
    PinLimitError,
)
from engines.hf_loading import encode_request, load_tokenizer
from engines.hf_scoring import TopTokens, encode_with_offsets, score_result
from engines.peft_adapters import check_adapter_dir
from registry.errors import RegistryError

MSG_PROMPT_LOGPROBS = "vLLM returned no prompt log-probabilities for request {request_id}"
MSG_NO_VLLM = "the vllm package is not installed; install the GPU extra with `pip install '.[gpu]'` on a CUDA machine"


class AsyncLLMClient(Protocol):
    """The part of vLLM's `AsyncLLM` (an `EngineClient`) this engine uses."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *, lora_request: Any = None) -> Any:
        """Stream `RequestOutput`s of one request."""

    async def add_lora(self, lora_request: Any) -> bool:
        """Load an adapter into the engine's cache."""

    async def remove_lora(self, lora_id: int) -> bool:
        """Remove an adapter."""

    async def pin_lora(self, lora_id: int) -> bool:
        """Pin an adapter (never evicted by vLLM)."""

    def shutdown(self) -> None:
        """Stop the engine core."""


@dataclass(frozen=True, slots=True)
class VLLMConfig:
    """vLLM-specific settings; the adapter capacity comes from `EngineConfig.max_loaded_adapters`."""

    max_loras: int = 8
    max_lora_rank: int = 32
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False
    dtype: str = "auto"
    extra_args: dict[str, Any] = field(default_factory=dict)


def vllm_api() -> SimpleNamespace:
    """The vLLM classes this engine needs, or a clear EngineUnavailableError when vLLM is missing."""
    try:
        sampling = importlib.import_module("vllm.sampling_params")
        lora = importlib.import_module("vllm.lora.request")
    except ImportError as exc:
        raise EngineUnavailableError("vllm", MSG_NO_VLLM) from exc
    return SimpleNamespace(
        SamplingParams=sampling.SamplingParams, RequestOutputKind=sampling.RequestOutputKind,
        LoRARequest=lora.LoRARequest,
    )


def build_async_llm(model: str, config: EngineConfig, vllm_config: VLLMConfig) -> Any:
    """Start vLLM's `AsyncLLM` with LoRA enabled (max_cpu_loras = the engine's adapter capacity)."""
    try:
        arg_utils = importlib.import_module("vllm.engine.arg_utils")
        async_llm = importlib.import_module("vllm.v1.engine.async_llm")
    except ImportError as exc:
        raise EngineUnavailableError("vllm", MSG_NO_VLLM) from exc
    args = arg_utils.AsyncEngineArgs(
        model=model, tokenizer=model, dtype=vllm_config.dtype, enable_lora=True,
        max_loras=vllm_config.max_loras, max_lora_rank=vllm_config.max_lora_rank,
        max_cpu_loras=max(config.max_loaded_adapters, vllm_config.max_loras),
        max_model_len=vllm_config.max_model_len, gpu_memory_utilization=vllm_config.gpu_memory_utilization,
        enforce_eager=vllm_config.enforce_eager, max_num_seqs=max(config.max_batch_size, 1),
        **vllm_config.extra_args,
    )
    return async_llm.AsyncLLM.from_engine_args(args)


class VLLMEngine(Engine):
    """Multi-LoRA generation on vLLM; same contract as `HFEngine`, batching done by vLLM's scheduler."""

    name = "vllm"

    def __init__(
        self,
        client: AsyncLLMClient,
        tokenizer: Any,
        config: EngineConfig | None = None,
        vllm_config: VLLMConfig | None = None,
        *,
        context_limit: int | None = None,
        api: SimpleNamespace | None = None,
    ) -> None:
        # `api` (vLLM's SamplingParams, RequestOutputKind, LoRARequest) is injectable for tests without vLLM.
        self._api = api or vllm_api()
        self.config = config or EngineConfig()
        self.vllm_config = vllm_config or VLLMConfig()
        self._client, self._tokenizer, self._context_limit = client, tokenizer, context_limit
        capacity = max(self.config.max_loaded_adapters, self.vllm_config.max_loras)
        self._cache = AdapterCache(
            capacity, self._add_lora, self._remove_lora, pin_hook=self._pin_lora, wait_s=self.config.adapter_wait_s
        )
        self._vllm_pinned: set[int] = set()
        self._closed = False
        self._running = 0

    @classmethod
    def from_model(
        cls, model: str, config: EngineConfig | None = None, vllm_config: VLLMConfig | None = None
    ) -> VLLMEngine:
        """Build the real vLLM engine for a model (HF id or local dir)."""
        config, vllm_config = config or EngineConfig(), vllm_config or VLLMConfig()
        vllm_api()  # fail with the clear message before anything heavy starts
        client = build_async_llm(model, config, vllm_config)
        limit = getattr(getattr(client, "model_config", None), "max_model_len", None)
        return cls(client, load_tokenizer(model), config, vllm_config, context_limit=limit)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer requests are encoded with (the model's own, chat template included)."""
        return self._tokenizer

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        """Text deltas of one request; the final chunk carries finish_reason and usage."""
        if self._closed:
            raise EngineClosedError()
        ids = encode_request(self._tokenizer, request)
        limit = self._context_limit
        if limit is not None and len(ids) + request.sampling.max_tokens > limit:
            raise ContextLengthError(len(ids), request.sampling.max_tokens, limit)
        handle = request.adapter
        if handle is not None:
            await self._cache.acquire(handle)
        self._running += 1
        try:
            async with contextlib.aclosing(self._generate(request, ids)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._running -= 1
            if handle is not None:
                await self._cache.release(handle.id)

    async def _generate(self, request: GenerationRequest, ids: list[int]) -> AsyncGenerator[StreamChunk, None]:
        params, lora = self._sampling(request.sampling), self._lora_request(request.adapter)
        completion_tokens = 0
        outputs = self._client.generate({"prompt_token_ids": ids}, params, request.request_id, lora_request=lora)
        # aclosing: a client that stops reading closes vLLM's generator, which aborts the request there.
        async with contextlib.aclosing(outputs) as stream:
            try:
                async for out in stream:
                    completion = out.outputs[0]
                    completion_tokens += len(completion.token_ids)
                    chunk = self._chunk(request, completion, len(ids), completion_tokens)
                    if chunk is not None:
                        yield chunk
                    if chunk is not None and chunk.final:
                        return
            except ValueError as exc:  # vLLM's validation errors (VLLMValidationError) are ValueErrors
                raise InvalidRequestError(str(exc)) from exc
            except RegistryError:
                raise
            except Exception as exc:  # engine dead / generate errors: fail this request with a typed error
                raise GenerationFailedError(f"{type(exc).__name__}: {exc}") from exc
        raise GenerationFailedError(f"vLLM ended request {request.request_id} without a finish reason")

    @staticmethod
    def _chunk(request: GenerationRequest, completion: Any, prompt_tokens: int, completion_tokens: int
               ) -> StreamChunk | None:
        reason = completion.finish_reason
        if reason is None:
            return StreamChunk(request.request_id, completion.text, adapter_id=request.adapter_id) \
                if completion.text else None
        if reason not in ("stop", "length"):
            raise GenerationFailedError(f"vLLM finished request {request.request_id} with {reason!r}")
        usage = Usage(prompt_tokens, completion_tokens)
        return StreamChunk(request.request_id, completion.text, reason, usage, request.adapter_id)

    def _sampling(self, sampling: SamplingParams) -> Any:
        api = self._api
        return api.SamplingParams(
            n=1, max_tokens=sampling.max_tokens, min_tokens=sampling.min_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed, stop=list(sampling.stop) or None,
            ignore_eos=sampling.ignore_eos, skip_special_tokens=True, output_kind=api.RequestOutputKind.DELTA,
        )

    def _lora_request(self, handle: AdapterHandle | None) -> Any:
        if handle is None:
            return None
        return self._api.LoRARequest(lora_name=str(handle.id), lora_int_id=handle.id, lora_path=str(handle.path))

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Log-probability of every prompt token (vLLM `prompt_logprobs`; the one token it must generate is dropped)."""
        if self._closed:
            raise EngineClosedError()
        ids, offsets = encode_with_offsets(self._tokenizer, request.prompt)
        limit = self._context_limit
        if limit is not None and len(ids) + 1 > limit:
            raise ContextLengthError(len(ids), 1, limit)
        handle = request.adapter
        if handle is not None:
            await self._cache.acquire(handle)
        self._running += 1
        try:
            positions = await self._prompt_logprobs(request, ids)
        finally:
            self._running -= 1
            if handle is not None:
                await self._cache.release(handle.id)
        logprobs, tops = _from_prompt_logprobs(positions, ids, request.top_logprobs)
        return score_result(self._tokenizer, request, ids, offsets, logprobs, tops)

    async def _prompt_logprobs(self, request: ScoreRequest, ids: list[int]) -> Sequence[Any]:
        api = self._api
        # vLLM has no max_tokens=0: generate one greedy token and ignore it. Prompt logprobs come from the raw
        # logits; a DELTA stream hands each part over once (all of it in the first output unless the prefill was
        # chunked), so the parts are joined.
        params = api.SamplingParams(n=1, max_tokens=1, temperature=0.0, prompt_logprobs=request.top_logprobs,
                                    output_kind=api.RequestOutputKind.DELTA)
        outputs = self._client.generate({"prompt_token_ids": ids}, params, request.request_id,
                                        lora_request=self._lora_request(request.adapter))
        positions: list[Any] = []
        async with contextlib.aclosing(outputs) as stream:
            try:
                async for out in stream:
                    positions.extend(getattr(out, "prompt_logprobs", None) or ())
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from exc
            except RegistryError:
                raise
            except Exception as exc:  # engine dead / generate errors: fail this request with a typed error
                raise GenerationFailedError(f"{type(exc).__name__}: {exc}") from exc
        if not positions:
            raise GenerationFailedError(MSG_PROMPT_LOGPROBS.format(request_id=request.request_id))
        return positions

    async def load_adapter(self, handle: AdapterHandle, pin: bool = False) -> None:
        """Preload an adapter into vLLM (evicting the least recently used idle one when full), maybe pinned."""
        if self._closed:
            raise EngineClosedError()
        await self._cache.load(handle, pin)

    async def unload_adapter(self, adapter_id: int) -> None:
        """Remove an adapter from vLLM once its requests finish."""
        await self._cache.unload(adapter_id)

    async def pin(self, adapter_id: int, pinned: bool = True) -> None:
        """Pin (never evicted) or unpin a resident adapter."""
        await self._cache.pin(adapter_id, pinned)

    def stats(self) -> EngineStats:
        """Adapter cache counters (batching happens inside vLLM and is not counted here)."""
        c = self._cache.counters()
        return EngineStats(
            engine=self.name, loaded=c.loaded, pinned=c.pinned, capacity=c.capacity, loads=c.loads,
            evictions=c.evictions, hits=c.hits, misses=c.misses, running=self._running,
        )

    async def close(self) -> None:
        """Shut the vLLM engine core down."""
        if not self._closed:
            self._closed = True
            self._client.shutdown()

    async def _add_lora(self, handle: AdapterHandle) -> None:
        check_adapter_dir(handle)
        if handle.rank > self.vllm_config.max_lora_rank:
            raise AdapterLoadError(handle.id, handle.path,
                                   f"rank {handle.rank} exceeds max_lora_rank {self.vllm_config.max_lora_rank}")
        try:
            added = await self._client.add_lora(self._lora_request(handle))
        except Exception as exc:  # vLLM reports bad adapters as ValueError/RuntimeError from its engine core
            raise AdapterLoadError(handle.id, handle.path, f"{type(exc).__name__}: {exc}") from exc
        if not added:
            raise AdapterLoadError(handle.id, handle.path, "vLLM refused the adapter (add_lora returned False)")

    async def _remove_lora(self, adapter_id: int) -> None:
        await self._client.remove_lora(adapter_id)
        self._vllm_pinned.discard(adapter_id)

    async def _pin_lora(self, handle: AdapterHandle, pinned: bool) -> None:
        # Unpinning is bookkeeping only: vLLM has no unpin, the adapter leaves vLLM on its next eviction.
        if not pinned or handle.id in self._vllm_pinned:
            return
        limit = self.vllm_config.max_loras - 1
        if len(self._vllm_pinned) >= limit:
            raise PinLimitError(handle.id, limit, self.vllm_config.max_loras)
        await self._client.pin_lora(handle.id)
        self._vllm_pinned.add(handle.id)


def _from_prompt_logprobs(
    positions: Sequence[Mapping[int, Any] | None], ids: Sequence[int], top_k: int
) -> tuple[list[float | None], list[TopTokens]]:
    """Our (logprob, top-k) lists from vLLM's per-position {token_id: Logprob} dicts (the first position is None).

    Each dict holds the top_k tokens plus the prompt's own token when that one ranks lower, so the k most likely
    entries are the top_k and the prompt token's entry is its logprob.
    """
    if len(positions) != len(ids):
        raise GenerationFailedError(f"vLLM scored {len(positions)} positions of a {len(ids)}-token prompt")
    chosen: list[float | None] = [None]
    tops: list[TopTokens] = [[]]
    for token, position in zip(ids[1:], positions[1:], strict=True):
        if not position or token not in position:
            raise GenerationFailedError(f"vLLM gave no logprob for prompt token {token}")
        chosen.append(float(position[token].logprob))
        ranked = sorted(((int(t), float(lp.logprob)) for t, lp in position.items()), key=lambda tv: -tv[1])
        tops.append(ranked[:top_k])
    return chosen, tops
