"""Shared engine contract: tiny models and real PEFT LoRAs, and checks every engine (hf, vllm) must pass.

Each `check_*` coroutine takes a running engine whose adapter capacity is `engine.stats().capacity` and
`loras` (at least capacity + 1 handles), and leaves the engine with no adapter loaded, so one engine can be
shared by a whole test module (a vLLM engine takes long to start).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.base import AdapterHandle, Engine, GenerationRequest, GenerationResult, SamplingParams, StreamChunk
from engines.errors import AdapterCapacityError
from engines.tiny_model import build_tiny_model

PROMPTS = (
    "The river starts in the hills",
    "Question: When did the bridge open? Answer:",
    "A knowledge module is",
    "Hello",
    "The committee met on Tuesday to discuss the new rules and",
    "Water boils at",
    "She walked to the market",
    "The library has more than",
)


def build_model(out_dir: Path, **overrides: Any) -> Path:
    """The platform's tiny default model (optionally reshaped) saved into `out_dir`."""
    return build_tiny_model(out_dir, seed=0, **overrides)


LORA_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def make_lora(model_dir: Path, out_dir: Path, adapter_id: int, *, rank: int = 4,
              targets: Sequence[str] = LORA_TARGETS, scale: float = 0.5) -> AdapterHandle:
    """A real PEFT LoRA on the model in `model_dir`, with random non-zero B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_id)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                lora_dropout=0.0))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, scale)  # PEFT initialises B to 0, which would make the adapter a no-op
    model.save_pretrained(out_dir)
    return AdapterHandle(id=adapter_id, key=f"sha-{adapter_id}", path=out_dir, rank=rank)


def greedy(max_tokens: int = 8, **kwargs: Any) -> SamplingParams:
    """Greedy decoding of a fixed length (EOS ignored, so lengths never depend on random weights)."""
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kwargs)


async def one(engine: Engine, prompt: str, adapter: AdapterHandle | None = None,
              sampling: SamplingParams | None = None) -> GenerationResult:
    """Generate one request on its own."""
    [result] = await engine.generate([GenerationRequest(prompt=prompt, adapter=adapter, sampling=sampling or greedy())])
    return result


async def collect(stream: AsyncGenerator[StreamChunk, None]) -> list[StreamChunk]:
    """Every chunk of a stream."""
    return [chunk async for chunk in stream]


async def unload_all(engine: Engine) -> None:
    """Leave the engine with nothing loaded or pinned."""
    for adapter_id in engine.stats().loaded:
        await engine.unload_adapter(adapter_id)


@contextlib.asynccontextmanager
async def clean(engine: Engine) -> AsyncIterator[None]:
    """Run a check and unload everything afterwards, pass or fail."""
    await unload_all(engine)
    try:
        yield
    finally:
        await unload_all(engine)


async def check_base_generation(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """Base-model requests work with no adapter loaded, with exact lengths and usage."""
    async with clean(engine):
        result = await one(engine, PROMPTS[0], sampling=greedy(6))
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == 6
        prompt_ids = engine.tokenizer(PROMPTS[0])["input_ids"]
        assert result.usage.prompt_tokens == len(prompt_ids)
        assert result.adapter_id is None and engine.stats().loaded == ()


async def check_adapter_changes_output(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """Greedy output with each adapter differs from the base model's, and base output is unchanged by loads."""
    async with clean(engine):
        base = await one(engine, PROMPTS[1], sampling=greedy(10))
        for handle in loras[:2]:
            adapted = await one(engine, PROMPTS[1], handle, greedy(10))
            assert adapted.text != base.text
            assert adapted.adapter_id == handle.id
        assert (await one(engine, PROMPTS[1], sampling=greedy(10))).text == base.text


async def check_mixed_batch_matches_alone(engine: Engine, loras: Sequence[AdapterHandle], *,
                                          strict: bool = True) -> None:
    """Concurrent requests with different adapters (and base) give each row what it gets when served alone."""
    async with clean(engine):
        adapters: list[AdapterHandle | None] = [None, loras[0], loras[1], loras[2], loras[0], None, loras[1], loras[2]]
        requests = [
            GenerationRequest(prompt=p, adapter=a, sampling=greedy(4 + i)) for i, (p, a) in enumerate(
                zip(PROMPTS, adapters, strict=True))
        ]
        together = await engine.generate(requests)
        for request, batched in zip(requests, together, strict=True):
            alone = await one(engine, request.prompt or "", request.adapter, request.sampling)
            assert batched.usage == alone.usage and batched.finish_reason == alone.finish_reason
            if strict:
                assert batched.text == alone.text, request
            else:  # engines without batch-invariant kernels may drift after a few tokens on near-ties
                half = len(alone.text) // 2
                assert batched.text[:half] == alone.text[:half], request


async def check_stream_matches_generate(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """Streamed deltas concatenate to the generated text; only the last chunk is final and has usage."""
    async with clean(engine):
        sampling = greedy(12)
        request = GenerationRequest(prompt=PROMPTS[2], adapter=loras[0], sampling=sampling)
        chunks = await collect(engine.stream(request))
        result = await one(engine, PROMPTS[2], loras[0], sampling)
        assert "".join(c.delta for c in chunks) == result.text
        assert len(chunks) > 1
        assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].usage == result.usage and chunks[-1].finish_reason == "length"
        assert all(c.request_id == request.request_id and c.adapter_id == loras[0].id for c in chunks)


async def check_stop_strings(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """A stop string ends the text just before its first occurrence, streamed or not."""
    async with clean(engine):
        full = (await one(engine, PROMPTS[4], loras[1], greedy(16))).text
        stop = _pick_stop(full)
        expected = full[: full.index(stop)]
        sampling = greedy(16, stop=(stop,))
        result = await one(engine, PROMPTS[4], loras[1], sampling)
        assert (result.text, result.finish_reason) == (expected, "stop")
        chunks = await collect(engine.stream(GenerationRequest(prompt=PROMPTS[4], adapter=loras[1], sampling=sampling)))
        assert "".join(c.delta for c in chunks) == expected


def _pick_stop(text: str) -> str:
    for start in range(len(text) // 2, len(text) - 2):
        candidate = text[start:start + 2]
        if candidate.strip() and "\ufffd" not in candidate:
            return candidate
    pytest.fail(f"no usable stop string in {text!r}")


async def check_min_tokens_and_seeded_sampling(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """min_tokens/ignore_eos fix the length; a seed makes sampling reproducible."""
    async with clean(engine):
        fixed = SamplingParams(max_tokens=9, min_tokens=9, ignore_eos=True, temperature=1.0)
        assert (await one(engine, PROMPTS[5], sampling=fixed)).usage.completion_tokens == 9
        seeded = greedy(12, temperature=0.9, top_p=0.9, seed=1234)
        first = await one(engine, PROMPTS[5], loras[0], seeded)
        again = await one(engine, PROMPTS[5], loras[0], seeded)
        assert first.text == again.text


async def check_lru_eviction(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """Least recently used idle adapter goes first; loads, evictions, hits and misses are counted."""
    async with clean(engine):
        capacity = engine.stats().capacity
        before = engine.stats()
        for handle in loras[:capacity]:
            await engine.load_adapter(handle)
        assert engine.stats().loaded == tuple(h.id for h in loras[:capacity])
        await one(engine, PROMPTS[3], loras[0], greedy(2))  # a hit: loras[0] becomes most recent
        await engine.load_adapter(loras[capacity])  # evicts loras[1], the least recently used
        after = engine.stats()
        expected = (*(h.id for h in loras[2:capacity]), loras[0].id, loras[capacity].id)
        assert after.loaded == expected
        assert after.loads - before.loads == capacity + 1
        assert after.evictions - before.evictions == 1
        assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)
        await one(engine, PROMPTS[3], loras[1], greedy(2))  # a miss: reloads loras[1], evicting the oldest
        final = engine.stats()
        assert final.misses - before.misses == 1 and final.evictions - before.evictions == 2
        assert loras[1].id in final.loaded and expected[0] not in final.loaded


async def check_pinning(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """A pinned adapter survives any amount of eviction pressure; unpinned it becomes evictable again."""
    async with clean(engine):
        capacity = engine.stats().capacity
        await engine.load_adapter(loras[0], pin=True)
        for handle in loras[1:capacity + 1]:
            await engine.load_adapter(handle)
        stats = engine.stats()
        assert loras[0].id in stats.loaded and stats.pinned == (loras[0].id,)
        await engine.pin(loras[0].id, pinned=False)
        await engine.load_adapter(loras[1])  # reloads the evicted one: loras[0] is now the LRU idle victim
        assert engine.stats().pinned == ()
        assert loras[0].id not in engine.stats().loaded


async def check_all_pinned(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """With every slot pinned, a new adapter is refused with AdapterCapacityError (503), for loads and requests."""
    async with clean(engine):
        capacity = engine.stats().capacity
        error = await _pin_all_then_load(engine, loras[:capacity], loras[capacity])
        assert error.status == 503
        if len(engine.stats().pinned) == capacity:
            with pytest.raises(AdapterCapacityError):
                await one(engine, PROMPTS[0], loras[capacity], greedy(2))


async def _pin_all_then_load(engine: Engine, pinned: Sequence[AdapterHandle], extra: AdapterHandle
                             ) -> AdapterCapacityError:
    """Pin every slot (an engine may refuse a pin already, e.g. vLLM's GPU-slot limit), then load one more."""
    try:
        for handle in pinned:
            await engine.load_adapter(handle, pin=True)
        await engine.load_adapter(extra)
    except AdapterCapacityError as exc:
        return exc
    pytest.fail("no AdapterCapacityError with every slot pinned")


async def check_in_flight_adapter_not_evicted(engine: Engine, loras: Sequence[AdapterHandle]) -> None:
    """An adapter serving a request is skipped by eviction; an explicit unload waits until the request ends."""
    async with clean(engine):
        capacity = engine.stats().capacity
        # Far more tokens than the checks below take: the request is still running when it is cancelled.
        long_run = GenerationRequest(prompt=PROMPTS[6], adapter=loras[0], sampling=greedy(1500))
        stream = engine.stream(long_run)
        first = await anext(stream)
        assert not first.final
        for handle in loras[1:capacity + 1]:
            await engine.load_adapter(handle)  # the last load must evict loras[1], not the busy loras[0]
        loaded = engine.stats().loaded
        assert loras[0].id in loaded and loras[1].id not in loaded
        unload = asyncio.ensure_future(engine.unload_adapter(loras[0].id))
        await asyncio.sleep(0.05)
        assert not unload.done()
        await stream.aclose()  # the client goes away: the request stops and lets go of its adapter
        await asyncio.wait_for(unload, timeout=30)
        assert loras[0].id not in engine.stats().loaded


CONTRACT = (
    check_base_generation,
    check_adapter_changes_output,
    check_mixed_batch_matches_alone,
    check_stream_matches_generate,
    check_stop_strings,
    check_min_tokens_and_seeded_sampling,
    check_lru_eviction,
    check_pinning,
    check_all_pinned,
    check_in_flight_adapter_not_evicted,
)
