"""The transformers + PEFT engine on the tiny default model with real LoRAs: the shared contract plus HF specifics."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from engines.base import AdapterHandle, ChatMessage, EngineConfig, GenerationRequest
from engines.errors import (
    AdapterLoadError,
    AdapterNotLoadedError,
    ContextLengthError,
    EngineClosedError,
    EngineOverloadedError,
    EngineUnavailableError,
)
from engines.factory import create_engine, vllm_config_of
from engines.hf import HFEngine
from engines.tiny_model import build_tiny_model, ensure_default_model, weights_digest
from registry.config import Settings
from registry.errors import UnsafeFormatError
from tests import engine_helpers as contract
from tests.engine_helpers import PROMPTS, collect, greedy, make_lora, one

T = TypeVar("T")
torch.set_num_threads(2)
# transformers 5 deprecates a helper PEFT still calls when it wraps a model; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """Run coroutines on one event loop for the whole module (the shared engine lives on it)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contract.build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loras(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[AdapterHandle]:
    root = tmp_path_factory.mktemp("loras")
    return [make_lora(model_dir, root / f"a{i}", 11 + i) for i in range(4)]


def new_engine(model_dir: Path, **config: Any) -> HFEngine:
    settings: dict[str, Any] = {"max_loaded_adapters": 3, "batch_window_ms": 5.0, "device": "cpu"} | config
    return HFEngine.from_pretrained(str(model_dir), EngineConfig(**settings))


@pytest.fixture(scope="module")
def engine(model_dir: Path, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> Iterator[HFEngine]:
    engine = new_engine(model_dir)
    yield engine
    run(engine.close())


@pytest.mark.parametrize("check", contract.CONTRACT, ids=lambda c: c.__name__)
def test_engine_contract(check: Callable[..., Coroutine[Any, Any, None]], engine: HFEngine,
                         loras: list[AdapterHandle], run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    run(check(engine, loras))


def test_concurrent_requests_share_forward_passes(engine: HFEngine, loras: list[AdapterHandle],
                                                  run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    adapters = [None, loras[0], loras[1], loras[2]] * 2
    requests = [GenerationRequest(prompt=p, adapter=a, sampling=greedy(6)) for p, a in zip(PROMPTS, adapters,
                                                                                            strict=True)]
    before = engine.stats()
    results = run(engine.generate(requests))
    after = engine.stats()
    assert [r.usage.completion_tokens for r in results] == [6] * 8
    assert after.batched_rows - before.batched_rows == 8
    assert after.batches - before.batches < 8
    # Served one at a time, 8 requests of 6 tokens would need 48 forward calls.
    assert after.forward_calls - before.forward_calls < 48
    run(contract.unload_all(engine))


def test_unload_frees_lora_parameters(engine: HFEngine, loras: list[AdapterHandle],
                                      run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    base_text = run(one(engine, PROMPTS[0])).text
    run(engine.load_adapter(loras[0]))
    run(engine.load_adapter(loras[1]))
    names = run(engine.lora_tensor_names())
    assert any(".adapter_11." in n for n in names) and any(".adapter_12." in n for n in names)
    run(engine.unload_adapter(loras[0].id))
    names = run(engine.lora_tensor_names())
    assert names and not any(".adapter_11." in n for n in names)
    run(engine.unload_adapter(loras[1].id))
    assert run(engine.lora_tensor_names()) == []
    # Back to the plain model: no LoRA wrapper modules left anywhere, and the same base output.
    assert not any(hasattr(m, "lora_A") for m in engine._adapters.model.modules())
    assert type(engine._adapters.model).__name__ == "LlamaForCausalLM"
    assert run(one(engine, PROMPTS[0])).text == base_text
    with pytest.raises(AdapterNotLoadedError):
        run(engine.unload_adapter(loras[1].id))


def test_chat_messages_use_the_chat_template(engine: HFEngine, run: Callable[[Coroutine[Any, Any, Any]], Any]
                                             ) -> None:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Where does the river start?"))
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|assistant|>\n")
    [chat, text] = run(engine.generate([
        GenerationRequest(messages=messages, sampling=greedy(6)),
        GenerationRequest(prompt=rendered[len("<|bos|>"):], sampling=greedy(6)),
    ]))
    assert chat.text == text.text and chat.usage == text.usage


def test_safetensors_only_and_bad_adapters_fail_cleanly(engine: HFEngine, loras: list[AdapterHandle],
                                                        model_dir: Path, tmp_path: Path,
                                                        run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(loras[0].path / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeFormatError):
        run(engine.load_adapter(AdapterHandle(90, "k", pickled, 4)))
    with pytest.raises(AdapterLoadError):
        run(engine.load_adapter(AdapterHandle(91, "k", tmp_path / "missing", 4)))
    other = contract.build_model(tmp_path / "wide", hidden_size=128, head_dim=32)
    wrong_shape = make_lora(other, tmp_path / "wide-lora", 92)
    base_text = run(one(engine, PROMPTS[1])).text
    with pytest.raises(AdapterLoadError):
        run(engine.load_adapter(wrong_shape))
    # A failed first load leaves the model untouched: base output as before, nothing resident.
    assert engine.stats().loaded == () and run(engine.lora_tensor_names()) == []
    assert run(one(engine, PROMPTS[1])).text == base_text
    with pytest.raises(AdapterLoadError):
        run(one(engine, PROMPTS[1], wrong_shape))


def test_context_length_and_queue_limits(model_dir: Path, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    async def body() -> None:
        engine = new_engine(model_dir, max_queue=2, batch_window_ms=50.0)
        try:
            with pytest.raises(ContextLengthError) as caught:
                await one(engine, PROMPTS[0], sampling=greedy(4000))
            assert caught.value.status == 400
            outcomes = await asyncio.gather(*(one(engine, p, sampling=greedy(2)) for p in PROMPTS[:3]),
                                            return_exceptions=True)
            assert sum(isinstance(o, EngineOverloadedError) for o in outcomes) == 1
        finally:
            await engine.close()
        with pytest.raises(EngineClosedError):
            await one(engine, PROMPTS[0])

    run(body())


def test_close_fails_queued_requests_and_restores_the_model(model_dir: Path, loras: list[AdapterHandle],
                                                            run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    async def body() -> None:
        engine = new_engine(model_dir)
        await engine.load_adapter(loras[0], pin=True)
        model = engine._adapters.model
        stream = engine.stream(GenerationRequest(prompt=PROMPTS[0], adapter=loras[0], sampling=greedy(400)))
        await anext(stream)
        await engine.close()
        with pytest.raises(EngineClosedError):
            await collect(stream)
        assert not any(hasattr(m, "lora_A") for m in model.base_model.modules())

    run(body())


def test_tiny_model_is_deterministic_and_built_once(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", seed=3)
    second = build_tiny_model(tmp_path / "b", seed=3)
    assert weights_digest(first) == weights_digest(second)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert weights_digest(build_tiny_model(tmp_path / "c", seed=4)) != weights_digest(first)
    built = ensure_default_model(tmp_path / "data")
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path / "data") == built == tmp_path / "data" / "models" / "tiny-llama"
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_engine_follows_a_new_event_loop_when_idle(model_dir: Path, loras: list[AdapterHandle]) -> None:
    engine = create_engine(Settings(engine="hf", base_model=str(model_dir)), EngineConfig(device="cpu"))
    assert isinstance(engine, HFEngine)
    first = asyncio.run(one(engine, PROMPTS[2], loras[0]))  # e.g. a worker that calls asyncio.run per job
    second = asyncio.run(one(engine, PROMPTS[2], loras[0]))
    assert first.text == second.text and engine.stats().hits == 1
    asyncio.run(engine.close())


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailableError, match="cannot load model"):
        HFEngine.from_pretrained(str(tmp_path / "no-model"), EngineConfig(device="cpu"))


def test_engine_tunables_come_from_the_settings(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMSERVE_ENGINE_MAX_LOADED_ADAPTERS", "3")
    monkeypatch.setenv("KMSERVE_VLLM_MAX_LORAS", "12")
    settings = Settings(engine="hf", base_model=str(model_dir), engine_max_batch_size=4, vllm_max_model_len=512)
    engine = create_engine(settings)
    assert isinstance(engine, HFEngine)
    assert (engine.config.max_loaded_adapters, engine.config.max_batch_size) == (3, 4)
    vllm = vllm_config_of(settings)  # what a GPU process would hand vLLM
    assert (vllm.max_loras, vllm.max_model_len, vllm.max_lora_rank, vllm.gpu_memory_utilization) == (12, 512, 32, 0.85)
    asyncio.run(engine.close())
