"""RECOMP compressors: sentence splitting, extractive selection, selective augmentation, the compress stage through
the real app, and `train_compressor` runs that register compressors the stage then uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from engines.base import Engine
from engines.compressor import extract, split_sentences
from engines.embedder import Embedder, shared_embedder
from engines.indexing import index_document
from registry.aliases import resolve_alias
from registry.config import Settings
from registry.db import transaction
from registry.models import DEFAULT_TENANT
from server.services.compress import MSG_NO_ABSTRACTIVE
from server.state import AppState
from tests.served import admin_headers, register_km_versions
from tests.tiny import save_lora_for
from trainer_worker.artifacts import Chunk
from trainer_worker.compressor_data import selective_target
from trainer_worker.context import JobContext
from trainer_worker.handlers import HandlerTable

torch.set_num_threads(2)
PASSAGES = [
    "Lanmark is a port city. The Varo river flows north through Lanmark before it reaches the sea. "
    "Its harbour is old.",
    "Bread in the hill villages is baked with barley flour. The winter festival lasts a week. "
    "Dr. Hale wrote about it.",
    "The observatory on Mount Tessel tracks comets. It publishes a star catalogue every year.",
]
QUESTION = "Which city does the Varo river flow through?"


def test_split_sentences_keeps_abbreviations_and_splits_lines() -> None:
    text = "Dr. Smith met J. R. Tolkien in 1950. They talked, e.g. about maps!\nDid it rain?\n\nYes it did\n- a list"
    assert split_sentences(text) == ["Dr. Smith met J. R. Tolkien in 1950.", "They talked, e.g. about maps!",
                                     "Did it rain?", "Yes it did", "- a list"]
    assert split_sentences("a wrapped\nline of text. Next one.") == ["a wrapped line of text.", "Next one."]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return shared_embedder(Settings())


def test_the_sentence_with_the_answer_ranks_first_and_order_is_kept(embedder: Embedder) -> None:
    top1 = extract(embedder, QUESTION, PASSAGES, k=1)
    assert top1.text == "The Varo river flows north through Lanmark before it reaches the sea."
    top3 = extract(embedder, QUESTION, PASSAGES, k=3)
    assert top1.sentences[0] in top3.sentences
    assert [(s.passage, s.position) for s in top3.sentences] == sorted((s.passage, s.position) for s in top3.sentences)


def test_selective_augmentation_drops_a_summary_that_does_not_help() -> None:
    assert selective_target("Lanmark.", with_summary=-3.0, closed_book=-2.5) == ""
    assert selective_target("Lanmark.", with_summary=-1.0, closed_book=-2.5) == "Lanmark."
    assert selective_target("", with_summary=0.0, closed_book=-2.5) == ""


@pytest.fixture
def indexed(state: AppState, tmp_path: Path, tiny_model_dir: Path) -> int:
    lora = save_lora_for(tiny_model_dir, tmp_path / "lora", seed=0)
    document_id = register_km_versions(state, [lora], text="river doc").document_id
    chunks = [Chunk(i, text, 40 * i, 40 * i + 40) for i, text in enumerate(PASSAGES)]
    index_document(state.settings, DEFAULT_TENANT, document_id, chunks)
    return document_id


def ask(client: TestClient, state: AppState, **body: Any) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1/query", json={"question": QUESTION, "max_tokens": 3, **body},
                           headers=admin_headers(state))
    return response.status_code, response.json()


def test_extractive_stage_puts_fewer_tokens_in_the_prompt(client: TestClient, state: AppState, indexed: int) -> None:
    status, full = ask(client, state, document_id=indexed, rag={"top_k": 3})
    assert status == 200 and full["compressed"] is None
    status, short = ask(client, state, document_id=indexed, rag={"top_k": 3}, compress="extractive", compress_k=2)
    assert status == 200, short
    assert "Varo river flows north through Lanmark" in short["compressed"]
    assert len(short["compressed"]) < sum(len(p["text"]) for p in short["passages"])
    assert short["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]
    assert short["timings_ms"]["compress"] > 0 and "compressor" not in short["adapters"]


def test_pipeline_retrieves_reranks_compresses_then_generates(
    client: TestClient, state: AppState, indexed: int
) -> None:
    body = {"document_id": indexed, "rag": {"top_k": 2, "pool": 3, "rerank": True}, "compress": "extractive",
            "compress_k": 1}
    status, answer = ask(client, state, **body)
    assert status == 200, answer
    passages = answer["passages"]
    assert len(passages) == 2 and passages[-1]["text"] == PASSAGES[0]  # best last
    assert passages[-1]["score"] > passages[0]["score"]
    assert answer["compressed"] == "The Varo river flows north through Lanmark before it reaches the sea."
    usage = answer["usage"]
    assert 0 < usage["prompt_tokens"] < usage["prompt_tokens_uncompressed"]
    _, full = ask(client, state, document_id=indexed, rag={"top_k": 2, "pool": 3, "rerank": True})
    assert full["usage"]["prompt_tokens"] == usage["prompt_tokens_uncompressed"]
    assert full["usage"]["prompt_tokens_uncompressed"] is None
    timings = answer["timings_ms"]
    assert {"retrieve", "rerank", "compress", "generate"} <= set(timings)
    assert all(timings[stage] > 0 for stage in ("retrieve", "rerank", "compress", "generate"))


def test_a_compressor_job_kind_is_accepted_by_the_admin_route(client: TestClient, state: AppState) -> None:
    body = {"kind": "train_compressor_abstractive", "payload": {"n_candidates": 4}}
    response = client.post("/admin/train", json=body, headers=admin_headers(state))
    assert response.status_code == 202, response.text
    job = state.queue.get(response.json()["id"])
    assert (job.kind, job.payload) == ("train_compressor_abstractive", {"n_candidates": 4})
    assert {"train_compressor_extractive", "train_compressor_abstractive"} <= set(HandlerTable().kinds)


def test_compress_needs_rag_and_abstractive_needs_a_trained_compressor(
    client: TestClient, state: AppState, indexed: int
) -> None:
    status, body = ask(client, state, document_id=indexed, compress="extractive")
    assert status == 422 and "compress works on retrieved passages" in body["error"]["message"]
    status, body = ask(client, state, document_id=indexed, rag={"top_k": 2}, compress="abstractive")
    assert status == 409
    assert body["error"] == {"code": "compressor_not_trained", "message": MSG_NO_ABSTRACTIVE}


def no_engine() -> Engine:
    raise AssertionError("train_compressor needs no serving engine")


def run_job(state: AppState, payload: dict[str, Any], kind: str = "train_compressor") -> dict[str, Any]:
    state.queue.enqueue(kind, payload)
    job = state.queue.claim("w1", [kind])
    assert job is not None
    ctx = JobContext(job=job, worker_id="w1", queue=state.queue, sessions=state.sessions, store=state.store,
                     settings=state.settings, engine_provider=no_engine)
    result = HandlerTable().resolve(kind)(ctx)
    assert result is not None
    assert HandlerTable().resolve(kind)(ctx) == result  # a retried attempt reports its version, trains nothing
    return result


def items(document_id: int) -> list[dict[str, Any]]:
    return [{"document_id": document_id, "question": QUESTION, "answer": "Lanmark"},
            {"document_id": document_id, "question": "What does the observatory track?", "answer": "comets"}]


def test_trained_extractive_compressor_is_registered_and_used(
    client: TestClient, state: AppState, indexed: int
) -> None:
    payload = {"items": items(indexed), "top_k": 3, "steps": 3, "rank": 4, "epsilon": 0.0, "batch_size": 2}
    result = run_job(state, payload, "train_compressor_extractive")
    assert result["method"] == "extractive" and result["examples"] + result["skipped_no_negative"] == 2
    with transaction(state.sessions) as session:
        adapter = resolve_alias(session, "compressor:extractive")
        assert (adapter.id, adapter.kind.value, adapter.rank) == (result["adapter_id"], "compressor", 4)
        assert sorted(adapter.target_modules) == ["query", "value"]
    status, body = ask(client, state, document_id=indexed, rag={"top_k": 3}, compress="extractive", compress_k=1)
    assert status == 200, body
    assert body["adapters"]["compressor"] == {"id": result["adapter_id"], "name": "compressor:extractive",
                                              "version": 1}
    assert body["compressed"]


def test_trained_abstractive_compressor_runs_before_the_answer(
    client: TestClient, state: AppState, indexed: int
) -> None:
    result = run_job(state, {"method": "abstractive", "items": items(indexed), "top_k": 2, "steps": 2, "rank": 4,
                             "max_summary_tokens": 8, "n_candidates": 2})
    assert result["summaries_kept"] + result["summaries_dropped"] == 2 and result["n_candidates"] == 2
    status, body = ask(client, state, document_id=indexed, rag={"top_k": 2}, compress="abstractive")
    assert status == 200, body
    assert body["adapters"]["compressor"]["name"] == "compressor:abstractive"
    assert body["adapters"]["km"]["name"] == f"km:{indexed}"
    assert isinstance(body["compressed"], str) and body["timings_ms"]["compress"] > 0
    assert result["adapter_id"] in state.require_generator().stats().loaded
