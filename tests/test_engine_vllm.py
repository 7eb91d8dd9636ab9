"""The vLLM engine: the shared contract on a GPU (marked `gpu`), and on CPU its import guard plus its own logic
(LoRA ids, pinning, streaming, error mapping) against a fake `AsyncLLM` client standing in for vLLM."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from engines.base import AdapterHandle, EngineConfig, GenerationRequest, SamplingParams, ScoreRequest
from engines.errors import (
    AdapterCapacityError,
    ContextLengthError,
    EngineUnavailableError,
    GenerationFailedError,
    InvalidRequestError,
)
from engines.tiny_model import build_tokenizer
from engines.vllm import MSG_NO_VLLM, AsyncLLMClient, VLLMConfig, VLLMEngine
from tests import engine_helpers as contract

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# -- GPU: the same contract as the HF engine -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_run() -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory: pytest.TempPathFactory,
              gpu_run: Callable[[Coroutine[Any, Any, Any]], Any]) -> Iterator[tuple[VLLMEngine, list[AdapterHandle]]]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM tests need a CUDA GPU")
    root = tmp_path_factory.mktemp("vllm")
    # head_dim 64: attention kernels on the GPU do not take the default model's head_dim 16.
    model_dir = contract.build_model(root / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    loras = [contract.make_lora(model_dir, root / f"a{i}", 11 + i, rank=8) for i in range(4)]

    async def start() -> VLLMEngine:
        return VLLMEngine.from_model(
            str(model_dir), EngineConfig(max_loaded_adapters=3, max_batch_size=16),
            VLLMConfig(max_loras=2, max_model_len=2048, gpu_memory_utilization=0.3, enforce_eager=True),
        )

    engine = gpu_run(start())  # AsyncLLM starts its output handler on the loop that creates it
    yield engine, loras
    gpu_run(engine.close())


GPU_CONTRACT = [
    functools.partial(contract.check_mixed_batch_matches_alone, strict=False)
    if check is contract.check_mixed_batch_matches_alone else check for check in contract.CONTRACT
]


@pytest.mark.gpu
@pytest.mark.parametrize("check", GPU_CONTRACT, ids=lambda c: getattr(c, "__name__", None) or c.func.__name__)
def test_vllm_engine_contract(check: Callable[..., Coroutine[Any, Any, None]],
                              gpu_setup: tuple[VLLMEngine, list[AdapterHandle]],
                              gpu_run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    engine, loras = gpu_setup
    gpu_run(check(engine, loras))


@pytest.mark.gpu
def test_vllm_prompt_logprobs_match_transformers(gpu_setup: tuple[VLLMEngine, list[AdapterHandle]],
                                                 gpu_run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine, loras = gpu_setup
    prompt = contract.PROMPTS[1]
    result = gpu_run(engine.score(ScoreRequest(prompt, adapter=loras[0], top_logprobs=2)))
    ids = [t.token_id for t in result.tokens]
    assert ids == list(engine.tokenizer(prompt)["input_ids"]) and result.tokens[0].logprob is None
    model_dir = loras[0].path.parent / "model"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                          str(loras[0].path)).eval()
    with torch.no_grad():
        table = reference(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    expected = [float(table[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    # vLLM runs the float32 checkpoint in 16-bit precision (dtype "auto"), hence the loose tolerance.
    assert [t.logprob for t in result.tokens[1:]] == pytest.approx(expected, abs=0.1)
    assert all(len(t.top) == 2 for t in result.tokens[1:])
    gpu_run(contract.unload_all(engine))


# -- CPU: import guard -----------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_without_vllm_the_module_imports_and_construction_explains() -> None:
    with pytest.raises(EngineUnavailableError) as caught:
        VLLMEngine(FakeClient(), build_tokenizer())
    assert MSG_NO_VLLM in caught.value.message and "pip install" in caught.value.message
    assert caught.value.status == 503
    with pytest.raises(EngineUnavailableError):
        VLLMEngine.from_model("any-model")


# -- CPU: the engine's own logic against a fake client ---------------------------------------------------------

@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


FAKE_API = SimpleNamespace(
    SamplingParams=lambda **kw: SimpleNamespace(**kw),
    RequestOutputKind=SimpleNamespace(DELTA="delta"),
    LoRARequest=FakeLoRARequest,
)


class FakeClient(AsyncLLMClient):
    """Plays vLLM's AsyncLLM: streams scripted DELTA outputs and records LoRA calls."""

    def __init__(self, pieces: tuple[str, ...] = ("Hel", "lo", "!"), finish: str = "length",
                 error: Exception | None = None) -> None:
        self.pieces, self.finish, self.error = pieces, finish, error
        self.calls: list[tuple[Any, ...]] = []
        self.aborted: list[str] = []

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *,
                       lora_request: Any = None) -> AsyncIterator[Any]:
        self.calls.append(("generate", prompt, sampling_params, request_id, lora_request))
        if self.error is not None:
            raise self.error
        try:
            for i, piece in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                completion = SimpleNamespace(text=piece, token_ids=[i, i], finish_reason=self.finish if last else None)
                yield SimpleNamespace(outputs=[completion])
        except GeneratorExit:
            self.aborted.append(request_id)
            raise

    async def add_lora(self, lora_request: Any) -> bool:
        self.calls.append(("add_lora", lora_request))
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.calls.append(("remove_lora", lora_id))
        return True

    async def pin_lora(self, lora_id: int) -> bool:
        self.calls.append(("pin_lora", lora_id))
        return True

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[AdapterHandle]:
    root = tmp_path_factory.mktemp("fake-adapters")
    handles = []
    for i in range(1, 5):
        path = root / f"a{i}"
        path.mkdir()
        (path / "adapter_config.json").write_text("{}")
        (path / "adapter_model.safetensors").write_bytes(b"")
        handles.append(AdapterHandle(100 + i, f"k{i}", path, 16))
    return handles


def fake_engine(client: FakeClient, **config: Any) -> VLLMEngine:
    return VLLMEngine(client, build_tokenizer(), EngineConfig(max_loaded_adapters=3), VLLMConfig(**config),
                      context_limit=2048, api=FAKE_API)


def test_fake_vllm_streams_with_registry_lora_ids(adapters: list[AdapterHandle]) -> None:
    async def body() -> None:
        client = FakeClient()
        engine = fake_engine(client)
        sampling = SamplingParams(max_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop=("\n",))
        request = GenerationRequest(prompt="Hello", adapter=adapters[0], sampling=sampling)
        chunks = await contract.collect(engine.stream(request))
        assert [c.delta for c in chunks] == ["Hel", "lo", "!"] and chunks[-1].finish_reason == "length"
        prompt_ids = engine.tokenizer("Hello")["input_ids"]
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(prompt_ids)
        assert chunks[-1].usage.completion_tokens == 6
        [result] = await engine.generate([request])
        lora = FakeLoRARequest("101", 101, str(adapters[0].path))
        add_calls = [c for c in client.calls if c[0] == "add_lora"]
        assert add_calls == [("add_lora", lora)]  # loaded once, then a cache hit
        _, prompt, params, request_id, used_lora = client.calls[-1]
        assert prompt == {"prompt_token_ids": prompt_ids} and used_lora == lora and request_id == request.request_id
        assert (params.output_kind, params.stop, params.seed, params.top_p, params.n) == ("delta", ["\n"], 3, 0.9, 1)
        assert result.text == "Hello!" and engine.stats().hits == 1 and engine.stats().misses == 1
        await engine.close()
        assert client.calls[-1] == ("shutdown",)

    asyncio.run(body())


def test_fake_vllm_pins_within_gpu_slots_and_evicts_with_remove(adapters: list[AdapterHandle]) -> None:
    async def body() -> None:
        client = FakeClient()
        engine = fake_engine(client, max_loras=2)
        await engine.load_adapter(adapters[0], pin=True)
        with pytest.raises(AdapterCapacityError, match="GPU slots"):
            await engine.load_adapter(adapters[1], pin=True)  # max_loras=2 leaves room for one pinned adapter
        await engine.load_adapter(adapters[2])
        await engine.load_adapter(adapters[3])  # capacity 3: evicts adapters[1], the oldest unpinned one
        assert ("pin_lora", 101) in client.calls and ("remove_lora", 102) in client.calls
        assert engine.stats().loaded == (101, 103, 104) and engine.stats().pinned == (101,)

    asyncio.run(body())


def test_fake_vllm_maps_errors_and_aborts(adapters: list[AdapterHandle]) -> None:
    async def body() -> None:
        aborted = FakeClient(finish="abort")
        with pytest.raises(GenerationFailedError, match="abort"):
            await contract.one(fake_engine(aborted), "Hi")
        with pytest.raises(InvalidRequestError, match="too long"):
            await contract.one(fake_engine(FakeClient(error=ValueError("prompt too long"))), "Hi")
        client = FakeClient(pieces=("a", "b", "c"))
        engine = fake_engine(client)
        stream = engine.stream(GenerationRequest(prompt="Hi", adapter=adapters[0]))
        await anext(stream)
        await stream.aclose()  # the client went away: vLLM's generator is closed (vLLM aborts there)
        assert client.aborted and engine.stats().running == 0
        await engine.unload_adapter(adapters[0].id)  # its reference was released, so this does not wait

    asyncio.run(body())


@dataclass
class FakeLogprob:
    logprob: float
    rank: int


class ScoringClient(FakeClient):
    """Plays vLLM answering a prompt_logprobs request: the parts of the prompt logprobs, then the one token."""

    def __init__(self, parts: list[list[Any]]) -> None:
        super().__init__()
        self.parts = parts

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *,
                       lora_request: Any = None) -> AsyncIterator[Any]:
        self.calls.append(("generate", prompt, sampling_params, request_id, lora_request))
        for i, part in enumerate(self.parts):
            last = i == len(self.parts) - 1
            completion = SimpleNamespace(text="x" if last else "", token_ids=[7] if last else [],
                                         finish_reason="length" if last else None)
            yield SimpleNamespace(prompt_logprobs=part, outputs=[completion])


def scripted_positions(ids: list[int]) -> list[Any]:
    """Per position: two likelier tokens (900, 901) and the prompt's own token ranked third."""
    return [None, *({token: FakeLogprob(-3.0 - i, 3), 900: FakeLogprob(-0.5, 1), 901: FakeLogprob(-1.0, 2)}
                    for i, token in enumerate(ids[1:]))]


def test_fake_vllm_scores_the_prompt_and_drops_the_generated_token(adapters: list[AdapterHandle]) -> None:
    async def body() -> None:
        tokenizer = build_tokenizer()
        prompt = "Hello there, the river"
        ids = list(tokenizer(prompt)["input_ids"])
        positions = scripted_positions(ids)
        client = ScoringClient([positions[:2], positions[2:]])  # a chunked prefill hands them over in parts
        engine = fake_engine(client)
        result = await engine.score(ScoreRequest(prompt, adapter=adapters[0], top_logprobs=2))
        assert [t.token_id for t in result.tokens] == ids
        assert [t.logprob for t in result.tokens] == [None, *(-3.0 - i for i in range(len(ids) - 1))]
        likely = (tokenizer.decode([900]), -0.5), (tokenizer.decode([901]), -1.0)
        assert result.tokens[0].top == () and all(t.top == likely for t in result.tokens[1:])
        assert result.tokens[0].offset == 0
        assert all(prompt[t.offset:].startswith(t.text) for t in result.tokens[1:])
        _, sent, params, request_id, lora = client.calls[-1]
        assert sent == {"prompt_token_ids": ids} and request_id == result.request_id
        assert (params.prompt_logprobs, params.max_tokens, params.temperature) == (2, 1, 0.0)
        assert lora == FakeLoRARequest("101", 101, str(adapters[0].path))
        one_top = await engine.score(ScoreRequest(prompt, top_logprobs=1))
        assert all(t.top == likely[:1] for t in one_top.tokens[1:])
        assert engine.stats().running == 0
        await engine.unload_adapter(adapters[0].id)  # the scoring request released it, so this does not wait

    asyncio.run(body())


def test_fake_vllm_scoring_errors(adapters: list[AdapterHandle]) -> None:
    async def body() -> None:
        ids = list(build_tokenizer()("Hello there")["input_ids"])
        short = fake_engine(ScoringClient([scripted_positions(ids)[:-1]]))
        with pytest.raises(GenerationFailedError, match="scored"):
            await short.score(ScoreRequest("Hello there"))
        with pytest.raises(GenerationFailedError, match="no prompt log-probabilities"):
            await fake_engine(ScoringClient([[]])).score(ScoreRequest("Hello there"))
        failing = FakeClient(error=ValueError("prompt_logprobs 30 exceeds max_logprobs 20"))
        with pytest.raises(InvalidRequestError, match="max_logprobs"):
            await fake_engine(failing).score(ScoreRequest("Hello there", adapter=adapters[1]))
        tight = VLLMEngine(ScoringClient([]), build_tokenizer(), context_limit=len(ids), api=FAKE_API)
        with pytest.raises(ContextLengthError):
            await tight.score(ScoreRequest("Hello there"))

    asyncio.run(body())
