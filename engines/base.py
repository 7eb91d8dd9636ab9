"""The one generation interface shared by the server and the trainer worker, and the values that cross it.

An engine serves many LoRA adapters over one base model. Callers never talk SQL to it: a server-side resolver
turns "km:<doc>" into an `AdapterHandle` whose files the adapter store has already checksum-verified, and the
engine loads adapters only from that path. This module imports neither torch nor vLLM.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import importlib.util
import math
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from engines.errors import InvalidRequestError, InvalidSamplingParamsError

if TYPE_CHECKING:
    from registry.config import Settings

FinishReason = Literal["stop", "length"]
Role = Literal["system", "user", "assistant"]
EngineKind = Literal["hf", "vllm"]

ROLES: tuple[Role, ...] = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16


def _fail(field_name: str, detail: str) -> InvalidSamplingParamsError:
    return InvalidSamplingParamsError(field_name, detail)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample: temperature 0 is greedy; `min_tokens`/`ignore_eos` fix output lengths for benchmarks."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        self._check_lengths()
        self._check_sampling()
        self._check_stop()

    def _check_lengths(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _fail("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _fail("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")

    def _check_sampling(self) -> None:
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise _fail("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise _fail("seed", f"must be an integer >= 0 or null, got {self.seed!r}")

    def _check_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _fail("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise _fail("stop", "every stop string must be a non-empty string")

    @property
    def greedy(self) -> bool:
        """True when decoding picks the most likely token (temperature 0)."""
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class AdapterHandle:
    """A resolved, verified adapter: registry primary key, store key/digest, local PEFT directory, LoRA rank."""

    id: int
    key: str
    path: Path
    rank: int

    def __post_init__(self) -> None:
        # Stable registry ids, never hash(): vLLM needs the same int for the same adapter in every process.
        if not _is_int(self.id) or self.id < 1:
            raise InvalidRequestError(f"adapter id must be a positive integer (registry key), got {self.id!r}")
        if not _is_int(self.rank) or self.rank < 1:
            raise InvalidRequestError(f"adapter rank must be a positive integer, got {self.rank!r}")
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn, rendered with the tokenizer's chat template."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequestError(f"message role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise InvalidRequestError("message content must be a string")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Prompt text OR chat messages, an optional adapter, sampling parameters and a request id."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    adapter: AdapterHandle | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages")
        if self.messages is not None:
            if not self.messages:
                raise InvalidRequestError("messages must not be empty")
            object.__setattr__(self, "messages", tuple(self.messages))

    @property
    def adapter_id(self) -> int | None:
        """The adapter's registry id, or None for the base model."""
        return self.adapter.id if self.adapter else None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request (completion counts every generated token, EOS included)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The finished text of one request."""

    request_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    adapter_id: int | None


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """A text delta; the last chunk of a stream carries finish_reason and usage (and maybe a final delta)."""

    request_id: str
    delta: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    adapter_id: int | None = None

    @property
    def final(self) -> bool:
        """True for the last chunk of the stream."""
        return self.finish_reason is not None


MAX_SCORE_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """Prompt text whose every token is scored (nothing is generated), with an optional adapter.

    `top_logprobs` asks for that many most likely tokens at each position besides the prompt's own token.
    """

    prompt: str
    adapter: AdapterHandle | None = None
    top_logprobs: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise InvalidRequestError("the prompt to score must be a non-empty string")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_SCORE_TOP_LOGPROBS:
            raise _fail("top_logprobs", f"must be an integer in 0..{MAX_SCORE_TOP_LOGPROBS}, "
                                        f"got {self.top_logprobs!r}")

    @property
    def adapter_id(self) -> int | None:
        """The adapter's registry id, or None for the base model."""
        return self.adapter.id if self.adapter else None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One prompt token: id, text, start offset in the prompt, log-probability given the tokens before it (None
    for the first token, which nothing predicts) and the most likely (text, logprob) pairs at its position."""

    token_id: int
    text: str
    offset: int
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """The scored tokens of one prompt, in order."""

    request_id: str
    tokens: tuple[TokenLogprob, ...]
    adapter_id: int | None

    @property
    def usage(self) -> Usage:
        """Every prompt token was read; none was generated."""
        return Usage(len(self.tokens), 0)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Adapter cache and batching counters (loaded is in LRU order, least recently used first)."""

    engine: str
    loaded: tuple[int, ...]
    pinned: tuple[int, ...]
    capacity: int
    loads: int
    evictions: int
    hits: int
    misses: int
    queued: int = 0
    running: int = 0
    batches: int = 0
    batched_rows: int = 0
    forward_calls: int = 0


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tunables shared by the engines (the vLLM engine adds its own)."""

    max_loaded_adapters: int = 8
    max_batch_size: int = 16
    batch_window_ms: float = 3.0
    max_queue: int = 1024
    max_concurrent_batches: int = 2
    adapter_wait_s: float = 30.0
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_loaded_adapters", "max_batch_size", "max_queue", "max_concurrent_batches"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidRequestError(f"engine setting {name} must be an integer >= 1, got {value!r}")
        if self.batch_window_ms < 0 or self.adapter_wait_s <= 0:
            raise InvalidRequestError("engine settings batch_window_ms must be >= 0 and adapter_wait_s > 0")


class Engine(abc.ABC):
    """A multi-LoRA generation engine; every method is safe to call concurrently from one event loop."""

    name: str = "engine"

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run requests concurrently (so they share batches) and return their results in order."""
        outcomes = await asyncio.gather(*(self._collect(r) for r in requests), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [o for o in outcomes if isinstance(o, GenerationResult)]

    async def _collect(self, request: GenerationRequest) -> GenerationResult:
        parts: list[str] = []
        async for chunk in self.stream(request):
            parts.append(chunk.delta)
            if chunk.finish_reason is not None and chunk.usage is not None:
                return GenerationResult(
                    request.request_id, "".join(parts), chunk.finish_reason, chunk.usage, request.adapter_id
                )
        raise InvalidRequestError(f"request {request.request_id} ended without a final chunk")

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The tokenizer prompts are encoded with (a transformers tokenizer, chat template included)."""

    @property
    def context_limit(self) -> int | None:
        """The model's context window in tokens (prompt plus output), when the engine knows it."""
        limit = getattr(self, "_context_limit", None)
        return limit if isinstance(limit, int) else None

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        """Text deltas of one request; the final chunk carries finish_reason and usage."""

    @abc.abstractmethod
    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Log-probability of every prompt token under the request's adapter (the adapter stays held meanwhile)."""

    @abc.abstractmethod
    async def load_adapter(self, handle: AdapterHandle, pin: bool = False) -> None:
        """Make an adapter resident (evicting the least recently used unpinned one if full), optionally pinned."""

    @abc.abstractmethod
    async def unload_adapter(self, adapter_id: int) -> None:
        """Free an adapter's memory, after the requests using it finish."""

    @abc.abstractmethod
    async def pin(self, adapter_id: int, pinned: bool = True) -> None:
        """Pin (never evicted) or unpin a loaded adapter."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current cache and batching counters."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting requests, fail queued ones, and release the model."""

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@functools.cache
def vllm_usable() -> bool:
    """True when a CUDA device and the vllm package are both present (looked up once per process: upload checks ask
    on every request, and neither changes while the process runs)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def select_engine(settings: Settings) -> EngineKind:
    """The engine to run: KMSERVE_ENGINE, where auto means vllm with CUDA and vllm installed, else hf."""
    if settings.engine == "auto":
        return "vllm" if vllm_usable() else "hf"
    return settings.engine
