"""Prompt scoring: `echo` + `logprobs` + `max_tokens: 0` on /v1/completions, through the official `openai` client
against a live loopback server, checked against a direct transformers (+ PEFT) forward pass of the tiny model;
multiple-choice answering on top of it; and the transformers engine holding the adapter while it scores."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi import FastAPI

from engines.base import AdapterHandle, EngineConfig, ScoreRequest
from engines.errors import EngineOverloadedError
from engines.hf import HFEngine
from engines.hf_loading import load_causal_lm, load_tokenizer
from evals.multiple_choice import option_context, option_text, score_options
from server.services.openai_compat import MSG_ECHO_STREAM, MSG_LOGPROBS_GENERATED, MSG_SCORE_NEEDS_ECHO
from server.state import AppState
from tests.live_server import live_app, openai_client
from tests.served import KmVersions, register_km_versions
from tests.tiny import save_lora_for

torch.set_num_threads(2)

PROMPT = "Question: When did the bridge open? Answer: In 1902, after four years of work."
OTHER = "The river starts in the hills above the town."
TOLERANCE = 1e-4


@dataclass
class Reference:
    """The tiny model run directly with transformers: plain, and with the KM's LoRA through PEFT."""

    tokenizer: Any
    base: Any
    adapted: Any

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def logprobs(self, text: str, adapted: bool = True) -> torch.Tensor:
        """Row t: the log-distribution of token t + 1 (the last position dropped)."""
        model = self.adapted if adapted else self.base
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([self.ids(text)])).logits[0]
        return logits[:-1].float().log_softmax(-1)

    def token_logprobs(self, text: str, adapted: bool = True) -> list[float]:
        ids = self.ids(text)
        table = self.logprobs(text, adapted)
        return [float(table[t, ids[t + 1]]) for t in range(len(ids) - 1)]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[FastAPI, str]]:
    with live_app(tmp_path_factory.mktemp("logprobs") / "data", tiny_model_dir) as served:
        yield served


@pytest.fixture(scope="module")
def state(live: tuple[FastAPI, str]) -> AppState:
    return live[0].state.kmserve  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def client(live: tuple[FastAPI, str], state: AppState) -> openai.OpenAI:
    return openai_client(live[1], state)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("logprob-loras")
    return [save_lora_for(tiny_model_dir, root / f"v{seed}", seed=seed) for seed in (7, 8)]


@pytest.fixture(scope="module")
def km(state: AppState, lora_dirs: list[Path]) -> KmVersions:
    return register_km_versions(state, lora_dirs[:1], text="logprob doc")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, lora_dirs: list[Path]) -> Reference:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(lora_dirs[0])).eval()
    return Reference(AutoTokenizer.from_pretrained(tiny_model_dir), base, adapted)


def score(client: openai.OpenAI, model: str, prompt: str | list[str], logprobs: int | None = 3) -> Any:
    return client.completions.create(model=model, prompt=prompt, echo=True, logprobs=logprobs, max_tokens=0,
                                     temperature=0)


def expected_top(reference: Reference, text: str, k: int) -> list[dict[str, float]]:
    """Per position: the k most likely tokens plus the prompt's own, first spelling kept on equal text."""
    ids, table = reference.ids(text), reference.logprobs(text)
    rows = []
    for t in range(len(ids) - 1):
        values, indices = table[t].topk(k)
        pairs = [*zip(indices.tolist(), values.tolist(), strict=True), (ids[t + 1], float(table[t, ids[t + 1]]))]
        row: dict[str, float] = {}
        for token, value in pairs:
            row.setdefault(reference.tokenizer.decode([token]), value)
        rows.append(row)
    return rows


def test_prompt_logprobs_equal_a_direct_forward_pass_with_the_adapter(
    client: openai.OpenAI, km: KmVersions, reference: Reference
) -> None:
    reply = score(client, f"km:{km.document_id}", PROMPT)
    [choice] = reply.choices
    logprobs = choice.logprobs
    assert choice.text == PROMPT and logprobs is not None
    ids = reference.ids(PROMPT)
    assert logprobs.tokens == [reference.tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs is not None and logprobs.token_logprobs[0] is None
    got = logprobs.token_logprobs[1:]
    assert got == pytest.approx(reference.token_logprobs(PROMPT), abs=TOLERANCE)
    assert logprobs.top_logprobs is not None and logprobs.top_logprobs[0] is None
    for served, wanted in zip(logprobs.top_logprobs[1:], expected_top(reference, PROMPT, 3), strict=True):
        assert served is not None and served.keys() == wanted.keys()
        assert list(served.values()) == pytest.approx(list(wanted.values()), abs=TOLERANCE)
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)


def test_text_offsets_locate_each_token_in_the_echoed_prompt(client: openai.OpenAI, km: KmVersions) -> None:
    logprobs = score(client, f"km:{km.document_id}", PROMPT, logprobs=0).choices[0].logprobs
    offsets, tokens = logprobs.text_offset, logprobs.tokens
    assert offsets[0] == 0 and tokens[0] == "<|bos|>"  # the BOS token generation adds too
    assert offsets == sorted(offsets) and len(offsets) == len(tokens)
    for offset, token in zip(offsets[1:], tokens[1:], strict=True):
        assert PROMPT[offset:].startswith(token), (offset, token)
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])  # logprobs=0: only the token itself


def test_base_model_batches_and_the_adapter_changes_scores(
    client: openai.OpenAI, km: KmVersions, reference: Reference
) -> None:
    base = score(client, "kmserve-tiny", PROMPT, logprobs=0).choices[0].logprobs.token_logprobs[1:]
    assert base == pytest.approx(reference.token_logprobs(PROMPT, adapted=False), abs=TOLERANCE)
    adapted = reference.token_logprobs(PROMPT)
    assert max(abs(b - a) for b, a in zip(base, adapted, strict=True)) > 1e-2
    batch = score(client, f"km:{km.document_id}", [PROMPT, OTHER], logprobs=2)
    assert [c.index for c in batch.choices] == [0, 1] and [c.text for c in batch.choices] == [PROMPT, OTHER]
    alone = score(client, f"km:{km.document_id}", OTHER, logprobs=2).choices[0].logprobs
    assert batch.choices[1].logprobs.token_logprobs == alone.token_logprobs
    assert batch.choices[1].logprobs.top_logprobs == alone.top_logprobs


def test_echo_with_generation_prepends_the_prompt(client: openai.OpenAI, km: KmVersions) -> None:
    kwargs: dict[str, Any] = {"model": f"km:{km.document_id}", "prompt": OTHER, "max_tokens": 5, "temperature": 0}
    plain = client.completions.create(**kwargs)
    echoed = client.completions.create(**kwargs, echo=True)
    assert echoed.choices[0].text == OTHER + plain.choices[0].text
    assert echoed.choices[0].logprobs is None


def test_unserved_combinations_are_refused(client: openai.OpenAI, km: KmVersions) -> None:
    model = f"km:{km.document_id}"
    with pytest.raises(openai.BadRequestError, match=re.escape(MSG_LOGPROBS_GENERATED)):
        client.completions.create(model=model, prompt=PROMPT, logprobs=2, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=re.escape(MSG_ECHO_STREAM)):
        client.completions.create(model=model, prompt=PROMPT, echo=True, max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match=re.escape(MSG_SCORE_NEEDS_ECHO)):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError, match="logprobs"):
        score(client, model, PROMPT, logprobs=6)
    with pytest.raises(openai.NotFoundError):
        score(client, "km:999999", PROMPT)


def test_multiple_choice_scores_only_the_option_tokens(
    client: openai.OpenAI, km: KmVersions, reference: Reference
) -> None:
    question = "When did the bridge open?"
    options = ["In 1902", "In the summer of the year after the war", "Never", "1847"]
    result = score_options(client, f"km:{km.document_id}", question, options)
    context = option_context(question)
    expected = []
    for option in options:
        text = option_text(context, option)
        encoded = reference.tokenizer(text, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]][1:]  # the positions that have a logprob
        values = [lp for start, lp in zip(starts, reference.token_logprobs(text), strict=True) if start >= len(context)]
        assert reference.tokenizer.decode(encoded["input_ids"][-len(values):]).strip() == option
        expected.append(sum(values) / len(values))
    assert list(result.scores) == pytest.approx(expected, abs=TOLERANCE)
    assert result.index == max(range(len(expected)), key=expected.__getitem__)
    assert result.token_counts[1] > result.token_counts[2]
    base = score_options(client, "kmserve-tiny", question, options)
    assert base.scores != pytest.approx(result.scores, abs=1e-3)  # the model id picks the adapter


def test_engine_holds_the_adapter_while_scoring(tiny_model_dir: Path, lora_dirs: list[Path]) -> None:
    model = load_causal_lm(str(tiny_model_dir), "cpu", "float32")
    first, second = (AdapterHandle(id=i + 1, key=f"k{i}", path=p, rank=4) for i, p in enumerate(lora_dirs))
    gate, entered = threading.Event(), threading.Event()

    def pause(*_: Any) -> None:  # runs on the engine's worker thread, inside the scoring forward pass
        entered.set()
        gate.wait(timeout=30)

    async def body() -> None:
        engine = HFEngine(model, load_tokenizer(str(tiny_model_dir)),
                          EngineConfig(max_loaded_adapters=1, adapter_wait_s=0.3))
        hook = model.model.embed_tokens.register_forward_pre_hook(pause)
        try:
            scoring = asyncio.create_task(engine.score(ScoreRequest(PROMPT, adapter=first, top_logprobs=1)))
            assert await asyncio.to_thread(entered.wait, 30)
            with pytest.raises(EngineOverloadedError, match="stayed busy"):
                await engine.load_adapter(second)  # the only slot holds the adapter being scored with
            assert engine.stats().loaded == (first.id,) and engine.stats().evictions == 0
            gate.set()
            result = await scoring
        finally:
            gate.set()
            hook.remove()
        assert result.adapter_id == first.id and result.usage.completion_tokens == 0
        await engine.load_adapter(second)  # idle now, so it is evicted
        assert engine.stats().loaded == (second.id,) and engine.stats().evictions == 1
        await engine.close()

    asyncio.run(body())
