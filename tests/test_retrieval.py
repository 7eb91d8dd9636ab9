"""Retrieval with real MiniLM embeddings: the embedder, indexing, the retriever, and `rag` through the real app."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engines.embedder import Embedder, EmbedderUnavailableError, shared_embedder
from engines.indexing import index_document
from engines.prompts import CLOSED_BOOK_PROMPT
from registry.config import Settings
from registry.db import write_transaction
from registry.documents import DocumentCreate, content_hash, create_document
from registry.models import DEFAULT_TENANT
from registry.vector_index import VectorIndex
from registry.vector_layout import Passage
from server.services.query import rag_messages
from server.services.retrieval import Retriever
from server.state import AppState
from tests.served import admin_headers, register_km_versions
from tests.tiny import save_lora_for
from trainer_worker.artifacts import Chunk

TEXTS = [
    "The Varo river flows north through the capital city of Lanmark before it reaches the sea.",
    "Bread in the hill villages is baked with barley flour and honey for the winter festival.",
    "The observatory on Mount Tessel tracks comets and publishes a star catalogue every year.",
    "The trade guilds of Lanmark elect a speaker who negotiates tariffs with neighbouring ports.",
]
OTHER_TEXTS = [
    "Glass makers on the island of Perrin colour their vases with cobalt from the eastern mines.",
    "Every spring the ferry to Perrin is repainted in the colours of the harbour master.",
]
RIVER_QUESTION = "Which city does the Varo river flow through?"


def chunks(texts: list[str]) -> list[Chunk]:
    return [Chunk(i, text, 20 * i, 20 * i + 20) for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return shared_embedder(Settings())


def test_embeddings_are_normalized_minilm_vectors(embedder: Embedder) -> None:
    first, again, other = embedder.embed([TEXTS[0], TEXTS[0], TEXTS[2]])
    assert len(first) == embedder.dimension == 384
    assert math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-4)
    assert first == again
    question = embedder.embed([RIVER_QUESTION])[0]
    assert _dot(question, first) > _dot(question, other) + 0.2
    assert embedder.embed([]) == []


def test_the_embedder_is_shared_and_safe_across_threads(embedder: Embedder) -> None:
    assert shared_embedder(Settings()) is embedder
    serial = [embedder.embed([text])[0] for text in TEXTS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda text: embedder.embed([text])[0], TEXTS))
    for a, b in zip(serial, parallel, strict=True):
        assert _dot(a, b) == pytest.approx(1.0, abs=1e-5)


def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbedderUnavailableError) as caught:
        Embedder(tmp_path / "no-model").embed(["x"])
    assert caught.value.status == 503
    assert "KMSERVE_EMBEDDING_MODEL" in caught.value.message


def test_index_document_then_retrieve_finds_the_relevant_chunk(tmp_path: Path, embedder: Embedder) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    assert index_document(settings, "t", 5, chunks(TEXTS)) == len(TEXTS)
    assert index_document(settings, "t", 5, chunks(TEXTS)) == len(TEXTS)  # re-ingest: same points
    with VectorIndex.open(settings) as index:
        assert len(index.point_ids("t", 5)) == len(TEXTS)
        hits = Retriever(index, embedder).retrieve("t", [5], RIVER_QUESTION, top_k=2)
        assert hits[0].index == 0
        assert len(hits) == 2 and hits[0].score > hits[1].score
        assert Retriever(index, embedder).retrieve("other-tenant", [5], RIVER_QUESTION, top_k=2) == []


def test_rag_prompt_numbers_the_passages_ahead_of_the_question() -> None:
    passages = [Passage(1, 3, "weak", 0.2), Passage(1, 0, "strong", 0.9)]
    (message,) = rag_messages("Q?", passages)
    assert message.role == "user"
    assert message.content == ("Consider the following passages:\nPassage 1: weak\nPassage 2: strong\n"
                               + CLOSED_BOOK_PROMPT.format(question="Q?"))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return save_lora_for(tiny_model_dir, tmp_path_factory.mktemp("rag-lora") / "l0", seed=0)


@pytest.fixture
def indexed(state: AppState, lora_dir: Path) -> int:
    """A document with a KM whose retrieval chunks are indexed."""
    document_id = register_km_versions(state, [lora_dir], text="river doc").document_id
    index_document(state.settings, DEFAULT_TENANT, document_id, chunks(TEXTS))
    return document_id


def post(client: TestClient, state: AppState, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1/query", json={"question": RIVER_QUESTION, "max_tokens": 4, **body},
                           headers=admin_headers(state))
    return response.status_code, response.json()


def test_rag_puts_the_best_passage_last(client: TestClient, state: AppState, indexed: int) -> None:
    status, closed = post(client, state, {"document_id": indexed})
    assert status == 200 and closed["passages"] == []
    status, rag = post(client, state, {"document_id": indexed, "rag": {"top_k": 2}})
    assert status == 200, rag
    passages = rag["passages"]
    assert [p["document_id"] for p in passages] == [indexed, indexed]
    assert passages[-1]["index"] == 0 and passages[-1]["text"] == TEXTS[0]
    assert passages[-1]["score"] > passages[0]["score"]
    assert rag["usage"]["prompt_tokens"] > closed["usage"]["prompt_tokens"]
    assert rag["adapters"]["km"]["name"] == f"km:{indexed}"
    assert rag["timings_ms"]["retrieve"] > 0 and "retrieve" not in closed["timings_ms"]


def test_rag_across_documents_with_the_base_model(client: TestClient, state: AppState, indexed: int) -> None:
    other = _document(state, "island doc", DEFAULT_TENANT)
    index_document(state.settings, DEFAULT_TENANT, other, chunks(OTHER_TEXTS))
    body = {"km": state.base_model_id, "question": "What do the glass makers of Perrin use for colour?",
            "rag": {"top_k": 3, "document_ids": [indexed, other]}}
    status, answer = post(client, state, body)
    assert status == 200, answer
    passages = answer["passages"]
    assert len(passages) == 3 and (passages[-1]["document_id"], passages[-1]["index"]) == (other, 0)
    assert [p["score"] for p in passages] == sorted(p["score"] for p in passages)
    assert answer["adapters"] == {"km": None, "ke": None}


def test_rag_streams_the_passages_in_the_done_event(client: TestClient, state: AppState, indexed: int) -> None:
    body = {"document_id": indexed, "question": RIVER_QUESTION, "max_tokens": 4, "rag": {"top_k": 2},
            "stream": True}
    with client.stream("POST", "/v1/query", json=body, headers=admin_headers(state)) as response:
        blocks = "".join(response.iter_text()).strip().split("\n\n")
    done = [json.loads(b.split("data: ", 1)[1]) for b in blocks if b.startswith("event: done")]
    assert [p["index"] for p in done[0]["passages"]][-1] == 0


def test_rag_before_indexing_falls_back_to_the_closed_book_prompt(
    client: TestClient, state: AppState, lora_dir: Path
) -> None:
    document_id = register_km_versions(state, [lora_dir], text="not indexed").document_id
    _, closed = post(client, state, {"document_id": document_id})
    status, rag = post(client, state, {"document_id": document_id, "rag": {"top_k": 2}})
    assert status == 200 and rag["passages"] == []
    assert rag["usage"]["prompt_tokens"] == closed["usage"]["prompt_tokens"]


def test_rerank_keeps_top_k_of_a_larger_pool(client: TestClient, state: AppState, indexed: int) -> None:
    status, body = post(client, state, {"document_id": indexed, "rag": {"top_k": 2, "pool": 4, "rerank": True}})
    assert status == 200, body
    passages = body["passages"]
    assert len(passages) == 2 and passages[-1]["index"] == 0
    assert passages[-1]["score"] > passages[0]["score"]
    assert body["timings_ms"]["rerank"] > 0 and body["timings_ms"]["retrieve"] > 0
    assert "reranker" not in body["adapters"]  # none trained: the bundled MiniLM ranks


def test_documents_of_another_tenant_are_404(client: TestClient, state: AppState, indexed: int) -> None:
    foreign = _document(state, "their doc", "other-tenant")
    index_document(state.settings, "other-tenant", foreign, chunks(OTHER_TEXTS))
    for ids in ([indexed, foreign], [999999]):
        status, body = post(client, state, {"km": state.base_model_id, "rag": {"document_ids": ids}})
        assert status == 404, body
        assert body["error"]["code"] == "not_found"


def test_rag_without_documents_is_422(client: TestClient, state: AppState) -> None:
    status, body = post(client, state, {"km": state.base_model_id, "rag": {"top_k": 2}})
    assert status == 422
    assert "rag needs documents" in body["error"]["message"]


def test_deleting_a_document_drops_its_vectors(client: TestClient, state: AppState, indexed: int) -> None:
    assert len(state.require_vector_index().point_ids(DEFAULT_TENANT, indexed)) == len(TEXTS)
    response = client.delete(f"/v1/documents/{indexed}", headers=admin_headers(state))
    assert response.status_code == 204
    assert state.require_vector_index().point_ids(DEFAULT_TENANT, indexed) == set()


def _document(state: AppState, text: str, tenant: str) -> int:
    with write_transaction(state.sessions) as session:
        document, _ = create_document(session, DocumentCreate(title=text, content_hash=content_hash(text),
                                                              size_bytes=len(text), tenant=tenant))
        return document.id


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))
