"""The official `openai` client, unchanged, against a real kmserve server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi import FastAPI

from server.state import AppState
from tests.live_server import live_app, openai_client
from tests.served import KmVersions, register_km_versions
from tests.tiny import save_lora_for

QUESTION = [{"role": "user", "content": "What is the capital of Varo?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[FastAPI, str]]:
    with live_app(tmp_path_factory.mktemp("openai") / "data", tiny_model_dir) as served:
        yield served


@pytest.fixture(scope="module")
def state(live: tuple[FastAPI, str]) -> AppState:
    return live[0].state.kmserve  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def client(live: tuple[FastAPI, str], state: AppState) -> openai.OpenAI:
    return openai_client(live[1], state)


@pytest.fixture(scope="module")
def km(state: AppState, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> KmVersions:
    root = tmp_path_factory.mktemp("openai-loras")
    return register_km_versions(state, [save_lora_for(tiny_model_dir, root / "v1", seed=11)], text="openai doc")


def test_models_list_names_base_and_kms(client: openai.OpenAI, km: KmVersions) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "kmserve-tiny"
    assert f"km:{km.document_id}" in ids


def test_chat_completion_with_a_km(client: openai.OpenAI, km: KmVersions) -> None:
    reply = client.chat.completions.create(model=f"km:{km.document_id}", messages=QUESTION, max_tokens=8,
                                           temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    base = client.chat.completions.create(model="kmserve-tiny", messages=QUESTION, max_tokens=8, temperature=0)
    assert base.choices[0].message.content != reply.choices[0].message.content


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI, km: KmVersions) -> None:
    kwargs = {"model": f"km:{km.document_id}", "messages": QUESTION, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_batch_and_stream(client: openai.OpenAI, km: KmVersions) -> None:
    batch = client.completions.create(model=f"km:{km.document_id}", prompt=["Varo is", "The founder"],
                                      max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    single = client.completions.create(model=f"km:{km.document_id}", prompt="Varo is", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=f"km:{km.document_id}", prompt="Varo is", max_tokens=6, temperature=0, stream=True))
    assert single.choices[0].text == batch.choices[0].text == streamed


def test_errors_map_to_openai_exceptions(client: openai.OpenAI, live: tuple[FastAPI, str]) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="km:999999", messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="kmserve-tiny", messages=QUESTION, max_tokens=4, n=2)
    anonymous = openai.OpenAI(base_url=f"{live[1]}/v1", api_key="kms_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
