"""Engine building blocks without a model: validation, engine selection, detokenization, the batch decoder's
padding/positions/stopping (on a fake forward pass), and the adapter cache's LRU/pin/refcount rules."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.adapter_cache import AdapterCache
from engines.base import AdapterHandle, ChatMessage, EngineConfig, GenerationRequest, SamplingParams, select_engine
from engines.decoding import RowText
from engines.errors import (
    AdapterCapacityError,
    AdapterLoadError,
    EngineOverloadedError,
    InvalidRequestError,
    InvalidSamplingParamsError,
)
from engines.hf_batching import BatchDecoder, RowSpec, cache_keyword
from registry.config import Settings

EOS = 2


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": ("",)}, "stop"),
    ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
])
def test_sampling_params_name_the_bad_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSamplingParamsError) as caught:
        SamplingParams(**kwargs)
    assert caught.value.details["field"] == field
    assert field in caught.value.message and caught.value.status == 422


def test_sampling_params_defaults_and_stop_list() -> None:
    params = SamplingParams(stop=["\n"])  # type: ignore[arg-type]
    assert params.stop == ("\n",) and params.greedy and params.max_tokens == 256


def test_request_and_handle_validation() -> None:
    with pytest.raises(InvalidRequestError, match="exactly one of prompt or messages"):
        GenerationRequest()
    with pytest.raises(InvalidRequestError, match="exactly one of prompt or messages"):
        GenerationRequest(prompt="a", messages=(ChatMessage("user", "b"),))
    with pytest.raises(InvalidRequestError, match="must not be empty"):
        GenerationRequest(messages=())
    with pytest.raises(InvalidRequestError, match="role"):
        ChatMessage("robot", "hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="registry key"):
        AdapterHandle(0, "k", Path("x"), 4)
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    assert GenerationRequest(prompt="a").request_id != GenerationRequest(prompt="a").request_id


def test_select_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_engine(Settings(engine="hf")) == "hf"
    assert select_engine(Settings(engine="vllm")) == "vllm"
    monkeypatch.setattr("engines.base.vllm_usable", lambda: False)
    assert select_engine(Settings(engine="auto")) == "hf"
    monkeypatch.setattr("engines.base.vllm_usable", lambda: True)
    assert select_engine(Settings(engine="auto")) == "vllm"


def byte_text(stop: tuple[str, ...] = ()) -> RowText:
    """Detokenization where every token is one UTF-8 byte (like byte-level BPE at its finest)."""
    return RowText(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stop)


def push_all(text: RowText, data: bytes) -> tuple[list[str], bool]:
    deltas = []
    for byte in data:
        delta, hit = text.push(byte)
        deltas.append(delta)
        if hit:
            return deltas, True
    return deltas, False


def test_row_text_holds_back_partial_characters() -> None:
    text = byte_text()
    deltas, _ = push_all(text, "aé".encode())
    assert deltas == ["a", "", "é"]
    assert text.push(0xE2)[0] == "" and text.flush() == "\ufffd"


def test_row_text_stop_strings_across_tokens() -> None:
    text = byte_text(("ab",))
    deltas, hit = push_all(text, b"xaacab")
    assert hit and "".join(deltas) == "xaac"
    assert deltas == ["x", "", "a", "ac", "", ""]
    no_stop = byte_text(("ab",))
    deltas, hit = push_all(no_stop, b"xa")
    assert not hit and "".join(deltas) + no_stop.flush() == "xa"


class FakeForward:
    """Stands in for the model: records inputs and always prefers EOS, then token 5."""

    def __init__(self, vocab: int = 10) -> None:
        self.vocab = vocab
        self.calls: list[tuple[dict[str, Any], list[str]]] = []

    def __call__(self, batch: dict[str, Any], names: list[str]) -> torch.Tensor:
        self.calls.append(({k: v for k, v in batch.items() if k != cache_keyword()}, names))
        logits = torch.zeros(batch["input_ids"].shape[0], self.vocab)
        logits[:, EOS], logits[:, 5] = 10.0, 5.0
        return logits


def decoder(rows: list[RowSpec], forward: FakeForward) -> BatchDecoder:
    return BatchDecoder(rows, forward, lambda ids: "".join(chr(97 + i) for i in ids if i != EOS), pad_id=0,
                        eos_ids=frozenset({EOS}), device=torch.device("cpu"))


def drain(batch: BatchDecoder) -> dict[int, list[Any]]:
    events: dict[int, list[Any]] = {}
    for event in batch.prefill():
        events.setdefault(event.row, []).append(event)
    while not batch.done:
        for event in batch.step():
            events.setdefault(event.row, []).append(event)
    return events


def test_batch_decoder_left_pads_and_counts_positions_per_row() -> None:
    forward = FakeForward()
    rows = [RowSpec([7, 8], "a", SamplingParams(max_tokens=1, ignore_eos=True)),
            RowSpec([3, 4, 5], "b", SamplingParams(max_tokens=3, ignore_eos=True))]
    events = drain(decoder(rows, forward))
    prefill, step, last = (call[0] for call in forward.calls)
    assert prefill["input_ids"].tolist() == [[0, 7, 8], [3, 4, 5]]
    assert prefill["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert prefill["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]]
    # Row 0 is done after one token and leaves the batch: later steps carry row 1 only, at its own positions.
    assert step["input_ids"].tolist() == [[EOS]] and step["position_ids"].tolist() == [[3]]
    assert step["attention_mask"].tolist() == [[1, 1, 1, 1]] and last["position_ids"].tolist() == [[4]]
    assert [c[1] for c in forward.calls] == [["a", "b"], ["b"], ["b"]]
    assert [e.finish_reason for e in events[0]] == ["length"]
    assert events[1][-1].completion_tokens == 3


def test_batch_decoder_on_a_real_model_reuses_its_cache_under_the_current_keyword() -> None:
    import warnings

    from tests.tiny import tiny_llama

    model = tiny_llama()
    prompts = [[1, 5, 9, 4], [1, 7]]

    def forward(batch: dict[str, Any], names: list[str]) -> torch.Tensor:
        return model(**batch, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    rows = [RowSpec(p, "base", SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts]
    batch = BatchDecoder(rows, forward, lambda ids: " ".join(map(str, ids)), pad_id=0, eos_ids=frozenset({EOS}),
                         device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated keyword would warn here
        events = drain(batch)
    for row, prompt in enumerate(prompts):
        # the same greedy tokens as a whole forward over the growing sequence each time (no cache at all)
        ids = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        text = "".join(event.delta for event in events[row])
        assert text.split() == [str(i) for i in ids[len(prompt):]], row


def test_batch_decoder_min_tokens_then_eos() -> None:
    rows = [RowSpec([1], "a", SamplingParams(max_tokens=8, min_tokens=3)),
            RowSpec([1], "b", SamplingParams(max_tokens=8))]
    events = drain(decoder(rows, FakeForward()))
    assert [(e.finish_reason, e.completion_tokens) for e in events[0]][-1] == ("stop", 4)
    assert "".join(e.delta for e in events[0]) == "fff"
    assert [(e.finish_reason, e.completion_tokens, e.delta) for e in events[1]] == [("stop", 1, "")]


def test_batch_decoder_drops_cancelled_rows() -> None:
    forward = FakeForward()
    batch = decoder([RowSpec([1], "a", SamplingParams(max_tokens=50, ignore_eos=True)),
                     RowSpec([1], "b", SamplingParams(max_tokens=3, ignore_eos=True))], forward)
    batch.prefill()
    batch.cancel(0)
    drain_rest = [batch.step() for _ in range(3)]
    assert batch.done and len(forward.calls) == 3 and drain_rest[-1] == []
    assert [c[1] for c in forward.calls[1:]] == [["b"], ["b"]]


def handle(adapter_id: int, key: str | None = None) -> AdapterHandle:
    return AdapterHandle(adapter_id, key or f"k{adapter_id}", Path(f"/adapters/{adapter_id}"), 8)


class Recorder:
    """Fake load/unload hooks of an engine, recording the calls."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail or set()

    async def load(self, h: AdapterHandle) -> None:
        if h.id in self.fail:
            raise AdapterLoadError(h.id, h.path, "broken")
        self.calls.append(("load", h.id))

    async def unload(self, adapter_id: int) -> None:
        self.calls.append(("unload", adapter_id))


def test_cache_defers_when_busy_and_refuses_when_all_pinned() -> None:
    async def body() -> None:
        rec = Recorder()
        changes: list[int] = []
        cache = AdapterCache(2, rec.load, rec.unload, on_change=lambda: changes.append(1), wait_s=0.05)
        assert await cache.try_acquire(handle(1)) and await cache.try_acquire(handle(2))
        assert not await cache.try_acquire(handle(3))  # both slots serve requests: try again later
        with pytest.raises(EngineOverloadedError):
            await cache.load(handle(3))
        await cache.release(1)
        assert changes and await cache.try_acquire(handle(3))
        assert rec.calls == [("load", 1), ("load", 2), ("unload", 1), ("load", 3)]
        await cache.release(2)
        await cache.release(3)
        await cache.pin(2)
        await cache.pin(3)
        with pytest.raises(AdapterCapacityError):
            await cache.try_acquire(handle(4))
        counters = cache.counters()
        assert (counters.loaded, counters.pinned, counters.evictions, counters.misses) == ((2, 3), (2, 3), 1, 3)

    asyncio.run(body())


def test_cache_failed_load_and_key_mismatch() -> None:
    async def body() -> None:
        rec = Recorder(fail={5})
        cache = AdapterCache(2, rec.load, rec.unload)
        with pytest.raises(AdapterLoadError):
            await cache.try_acquire(handle(5))
        assert cache.counters().loaded == () and cache.counters().loads == 0
        await cache.load(handle(6))
        with pytest.raises(AdapterLoadError, match="already loaded with key"):
            await cache.try_acquire(handle(6, key="other"))

    asyncio.run(body())
