"""The transformers + PEFT engine (CPU or GPU): mixed-adapter batches, an LRU of resident LoRAs, token streaming.

How a request flows: `stream` tokenizes it and queues it; a dispatcher task waits `batch_window_ms` for requests
arriving together, takes up to `max_batch_size` of them whose adapters are (or can be made) resident, and starts
a batch. A batch is decoded by `BatchDecoder` with ONE forward pass per step for all its rows, each row with its
own adapter (PEFT `adapter_names`), sampling settings and stopping rules; deltas go to each request's queue.
All model work (forward steps, adapter loads and unloads) runs on one worker thread, so it is serialised, and up
to `max_concurrent_batches` batches interleave their steps so a long batch does not starve new requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from engines.adapter_cache import AdapterCache
from engines.base import (
    AdapterHandle,
    Engine,
    EngineConfig,
    EngineStats,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    StreamChunk,
    Usage,
)
from engines.errors import (
    ContextLengthError,
    EngineClosedError,
    EngineError,
    EngineOverloadedError,
    GenerationFailedError,
)
from engines.hf_batching import BatchDecoder, RowEvent, RowSpec
from engines.hf_loading import context_limit, encode_request, eos_token_ids, load_causal_lm, load_tokenizer
from engines.hf_scoring import encode_with_offsets, prompt_logprobs, score_result
from engines.peft_adapters import BASE_ADAPTER, PeftAdapterSet, adapter_name
from registry.errors import RegistryError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
MSG_OTHER_LOOP = "the engine is serving requests on another event loop; use one loop per engine while it is busy"
T = TypeVar("T")


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    prompt_ids: list[int]
    chunks: asyncio.Queue[StreamChunk | BaseException]
    cancelled: bool = False
    holds_adapter: bool = False
    finished: bool = False
    decoder: BatchDecoder | None = None
    row: int = 0

    def fail(self, error: BaseException) -> None:
        """End the request's stream with an error (once)."""
        if not self.finished:
            self.finished = True
            self.chunks.put_nowait(error)


class HFEngine(Engine):
    """Multi-LoRA generation with transformers + PEFT; see the module docstring for the request flow."""

    name = "hf"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EngineConfig | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self._adapters = PeftAdapterSet(model.eval())
        self._tokenizer = tokenizer
        self._eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else min(self._eos_ids, default=0)
        self._context_limit = context_limit(model)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmserve-hf")
        self._cache = AdapterCache(
            self.config.max_loaded_adapters, self._load_on_worker, self._unload_on_worker,
            on_change=self._wake, wait_s=self.config.adapter_wait_s,
        )
        self._pending: deque[_Job] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent_batches)
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False
        self._running_rows = 0
        self.batches = self.batched_rows = self.forward_calls = 0

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, config: EngineConfig | None = None) -> HFEngine:
        """Load a model and its tokenizer (HF id or local dir) and wrap them in an engine."""
        config = config or EngineConfig()
        model = load_causal_lm(model_id_or_path, config.device, config.dtype)
        return cls(model, load_tokenizer(model_id_or_path), config)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer requests are encoded with."""
        return self._tokenizer

    async def lora_tensor_names(self) -> list[str]:
        """Names of the LoRA tensors currently in the model (read on the worker thread)."""
        return await self._on_worker(self._adapters.lora_tensor_names)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        """Text deltas of one request; the final chunk carries finish_reason and usage."""
        job = self._submit(request)
        try:
            while True:
                item = await job.chunks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.final:
                    return
        finally:
            self._cancel(job)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Log-probability of every prompt token: one forward pass beside the decode batches, the adapter held."""
        self._check_open()
        ids, offsets = encode_with_offsets(self._tokenizer, request.prompt)
        if len(ids) > self._context_limit:
            raise ContextLengthError(len(ids), 0, self._context_limit)
        handle, held = request.adapter, False
        try:
            if handle is not None:
                await self._cache.acquire(handle)  # a held adapter is never evicted (refcount > 0)
                held = True
            logprobs, tops = await self._on_worker(functools.partial(
                prompt_logprobs, self._adapters.forward_logits, ids, _peft_name(handle), request.top_logprobs,
                self._adapters.device))
        except RegistryError:
            raise
        except Exception as exc:  # a failed forward fails this request only, as in a decode batch
            logger.exception("scoring request %s failed", request.request_id)
            raise GenerationFailedError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if held and handle is not None:
                await self._cache.release(handle.id)
        return score_result(self._tokenizer, request, ids, offsets, logprobs, tops)

    async def load_adapter(self, handle: AdapterHandle, pin: bool = False) -> None:
        """Make an adapter resident (evicting the least recently used idle one when full), optionally pinned."""
        self._check_open()
        await self._cache.load(handle, pin)

    async def unload_adapter(self, adapter_id: int) -> None:
        """Free an adapter once the requests using it finish."""
        self._check_open()
        await self._cache.unload(adapter_id)

    async def pin(self, adapter_id: int, pinned: bool = True) -> None:
        """Pin (never evicted) or unpin a resident adapter."""
        self._check_open()
        await self._cache.pin(adapter_id, pinned)

    def stats(self) -> EngineStats:
        """Adapter cache counters plus queue and batching counters."""
        c = self._cache.counters()
        return EngineStats(
            engine=self.name, loaded=c.loaded, pinned=c.pinned, capacity=c.capacity, loads=c.loads,
            evictions=c.evictions, hits=c.hits, misses=c.misses, queued=len(self._pending),
            running=self._running_rows, batches=self.batches, batched_rows=self.batched_rows,
            forward_calls=self.forward_calls,
        )

    async def close(self) -> None:
        """Fail queued and running requests, drop every adapter from the model and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        # Tasks of an earlier event loop were already cancelled when that loop ended.
        tasks = [t for t in (self._dispatcher, *self._batches) if t is not None and t.get_loop() is loop]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._pending:
            self._pending.popleft().fail(EngineClosedError())
        for adapter_id in self._cache.counters().loaded:
            await self._on_worker(functools.partial(self._adapters.unload, adapter_id))
        self._worker.shutdown(wait=True)

    # -- request intake -------------------------------------------------------------------------------------

    def _submit(self, request: GenerationRequest) -> _Job:
        self._check_open()
        if len(self._pending) >= self.config.max_queue:
            raise EngineOverloadedError(f"{len(self._pending)} requests are already queued")
        ids = encode_request(self._tokenizer, request)
        if len(ids) + request.sampling.max_tokens > self._context_limit:
            raise ContextLengthError(len(ids), request.sampling.max_tokens, self._context_limit)
        job = _Job(request, ids, asyncio.Queue())
        self._pending.append(job)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="kmserve-hf-dispatch")
        self._wake()
        return job

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        if job.decoder is not None and not job.finished:
            job.decoder.cancel(job.row)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError()
        self._bind_loop()

    def _bind_loop(self) -> None:
        """Follow the caller to a new event loop when idle (e.g. a worker calling asyncio.run per job)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._pending = deque(job for job in self._pending if not job.cancelled)
        if self._pending or self._batches or self._running_rows:
            raise EngineError(MSG_OTHER_LOOP)
        # asyncio primitives belong to the loop that first used them, so an idle engine makes fresh ones.
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent_batches)
        self._dispatcher = None
        self._cache.rebind()

    def _wake(self) -> None:
        self._wakeup.set()

    # -- batching -------------------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            # Requests that arrive within the window share the batch (and its forward passes).
            await asyncio.sleep(self.config.batch_window_ms / 1000)
            await self._slots.acquire()
            jobs = await self._take_batch()
            if not jobs:
                self._slots.release()  # all deferred: a finishing batch or an unload wakes us again
                continue
            task = asyncio.create_task(self._run_batch(jobs), name="kmserve-hf-batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            if self._pending:
                self._wake()

    async def _take_batch(self) -> list[_Job]:
        jobs: list[_Job] = []
        deferred: list[_Job] = []
        taken: list[_Job] = []
        try:
            while self._pending and len(jobs) < self.config.max_batch_size:
                job = self._pending.popleft()
                taken.append(job)
                ready = None if job.cancelled else await self._reserve_adapter(job)
                if ready is not None:
                    (jobs if ready else deferred).append(job)
        except asyncio.CancelledError:
            for job in taken:
                job.fail(EngineClosedError())
            raise
        # Deferred requests keep their place at the head of the queue.
        self._pending.extendleft(reversed(deferred))
        return jobs

    async def _reserve_adapter(self, job: _Job) -> bool | None:
        """True/False: adapter reserved / no free slot yet (or no adapter needed: True); None: request failed."""
        handle = job.request.adapter
        if handle is None:
            return True
        try:
            job.holds_adapter = await self._cache.try_acquire(handle)
        except RegistryError as exc:  # all slots pinned, or a broken adapter: fails this request only
            job.fail(exc)
            return None
        except Exception as exc:  # e.g. an eviction that failed inside PEFT: keep the dispatcher alive
            logger.exception("reserving adapter %d failed", handle.id)
            job.fail(GenerationFailedError(f"{type(exc).__name__}: {exc}"))
            return None
        return job.holds_adapter

    async def _run_batch(self, jobs: list[_Job]) -> None:
        self.batches += 1
        self.batched_rows += len(jobs)
        self._running_rows += len(jobs)
        decoder: BatchDecoder | None = None
        try:
            decoder = self._new_decoder(jobs)
            events = await self._on_worker(decoder.prefill)
            while True:
                self._publish(jobs, events)
                if decoder.done:
                    break
                events = await self._on_worker(decoder.step)
        except asyncio.CancelledError:
            for job in jobs:
                job.fail(EngineClosedError())
            raise
        except Exception as exc:  # a failed forward fails this batch's requests; the engine keeps serving
            logger.exception("batch of %d rows failed", len(jobs))
            for job in jobs:
                job.fail(GenerationFailedError(f"{type(exc).__name__}: {exc}"))
        finally:
            await self._finish_batch(jobs, decoder)

    def _new_decoder(self, jobs: list[_Job]) -> BatchDecoder:
        rows = [RowSpec(j.prompt_ids, _peft_name(j.request.adapter), j.request.sampling) for j in jobs]
        decoder = BatchDecoder(
            rows, self._adapters.forward_last, self._decode, pad_id=self._pad_id, eos_ids=self._eos_ids,
            device=self._adapters.device,
        )
        for row, job in enumerate(jobs):
            job.decoder, job.row = decoder, row
            if job.cancelled:
                decoder.cancel(row)
        return decoder

    def _publish(self, jobs: list[_Job], events: list[RowEvent]) -> None:
        for event in events:
            job = jobs[event.row]
            request = job.request
            if event.finish_reason is not None:
                job.finished = True
                usage = Usage(len(job.prompt_ids), event.completion_tokens)
                job.chunks.put_nowait(StreamChunk(
                    request.request_id, event.delta, event.finish_reason, usage, request.adapter_id))
            elif event.delta:
                job.chunks.put_nowait(StreamChunk(request.request_id, event.delta, adapter_id=request.adapter_id))

    async def _finish_batch(self, jobs: list[_Job], decoder: BatchDecoder | None) -> None:
        self.forward_calls += decoder.forward_calls if decoder is not None else 0
        self._running_rows -= len(jobs)
        for job in jobs:
            if job.holds_adapter and job.request.adapter is not None:
                job.holds_adapter = False
                await self._cache.release(job.request.adapter.id)
        self._slots.release()
        self._wake()

    # -- worker thread --------------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    async def _on_worker(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    async def _load_on_worker(self, handle: AdapterHandle) -> None:
        await self._on_worker(functools.partial(self._adapters.load, handle))

    async def _unload_on_worker(self, adapter_id: int) -> None:
        await self._on_worker(functools.partial(self._adapters.unload, adapter_id))


def _peft_name(adapter: AdapterHandle | None) -> str:
    return adapter_name(adapter.id) if adapter is not None else BASE_ADAPTER

