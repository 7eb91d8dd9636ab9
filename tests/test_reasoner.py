"""KARD reasoning distillation: rationale filtering, the `train_reasoner` job, and `reason: true` through the app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import pytest
import torch
from fastapi.testclient import TestClient

from engines.base import Engine, GenerationResult, Usage
from engines.indexing import index_document
from engines.reasoning import REASONER_ALIAS, extract_answer, leads_to, reasoner_prompt, reasoner_target
from registry.aliases import resolve_alias
from registry.db import write_transaction
from registry.documents import DocumentCreate, content_hash, create_document
from registry.models import DEFAULT_TENANT
from server.services.rerank import MSG_NO_REASONER
from server.state import AppState
from tests.served import admin_headers
from trainer_worker.artifacts import Chunk
from trainer_worker.context import JobContext, PermanentJobError
from trainer_worker.rationales import Rationale, TrainItem, keep_correct, load_items, teacher_rationales
from trainer_worker.train_reasoner import run

torch.set_num_threads(2)
TEXTS = [
    "The Varo river flows north through the capital city of Lanmark before it reaches the sea.",
    "Bread in the hill villages is baked with barley flour and honey for the winter festival.",
    "The trade guilds of Lanmark elect a speaker who negotiates tariffs with neighbouring ports.",
]
RIVER = TrainItem(1, "Which city does the Varo river flow through?", "Lanmark")


def test_rationales_are_kept_only_when_their_final_answer_is_the_gold_one() -> None:
    kept = Rationale(RIVER, "The Varo flows north through the capital. The answer is lanmark.")
    late = Rationale(RIVER, "Some say Perrin.\nAnswer: The city of Lanmark")
    wrong_final = Rationale(RIVER, "Lanmark is the capital, but the river passes Perrin. The answer is Perrin.")
    unrelated = Rationale(RIVER, "Bread is baked with barley.")
    assert keep_correct([kept, late, wrong_final, unrelated, Rationale(RIVER, "  ")]) == [kept, late]
    assert extract_answer("x. The answer is Lanmark.\nmore") == "Lanmark"
    assert leads_to("Answer: the Lanmark!", "lanmark") and not leads_to("Answer: ", "lanmark")


def test_reasoner_prompt_and_target() -> None:
    prompt = reasoner_prompt(RIVER.question, ["weak", "strong"])
    assert prompt.index("Passage 1: weak") < prompt.index("Passage 2: strong") < prompt.index(RIVER.question)
    assert reasoner_target(" It flows there. ", "Lanmark") == "It flows there.\nAnswer: Lanmark"


@pytest.fixture
def document_id(state: AppState) -> int:
    """An indexed document (no KM: the reasoner answers over its passages)."""
    with write_transaction(state.sessions) as session:
        document, _ = create_document(session, DocumentCreate(title="river", content_hash=content_hash("river"),
                                                              size_bytes=5))
        doc_id = document.id
    index_document(state.settings, DEFAULT_TENANT, doc_id, [Chunk(i, t, i, i + 1) for i, t in enumerate(TEXTS)])
    return doc_id


def start_job(state: AppState, payload: dict[str, Any]) -> JobContext:
    """A claimed `train_reasoner` job (no engine: rationales are inline)."""
    state.queue.enqueue("train_reasoner", payload)
    job = state.queue.claim("w1", ["train_reasoner"])
    assert job is not None
    return JobContext(job=job, worker_id="w1", queue=state.queue, sessions=state.sessions, store=state.store,
                      settings=state.settings, engine_provider=MagicMock(spec=Callable, side_effect=AssertionError))


def payload(document_id: int, rationales: list[list[str]]) -> dict[str, Any]:
    items = [{"document_id": document_id, "question": RIVER.question, "answer": "Lanmark"},
             {"document_id": document_id, "question": "What do the guilds of Lanmark elect?", "answer": "a speaker"}]
    return {"items": items, "rationales": rationales, "steps": 3, "rank": 4, "top_k": 2}


def test_no_kept_rationale_fails_the_job_permanently(state: AppState, document_id: int) -> None:
    with pytest.raises(PermanentJobError, match="no rationale leads to the gold answer"):
        run(start_job(state, payload(document_id, [["The answer is Perrin."], ["No idea."]])))


def test_trained_reasoner_is_registered_and_serves_reason_queries(
    client: TestClient, state: AppState, document_id: int
) -> None:
    body = {"document_id": document_id, "question": RIVER.question, "max_tokens": 8, "reason": True}
    missing = client.post("/v1/query", json=body, headers=admin_headers(state))
    assert missing.status_code == 400 and missing.json()["error"]["message"] == MSG_NO_REASONER
    rationales = [["The Varo flows through the capital, Lanmark. The answer is Lanmark.", "The answer is Perrin."],
                  ["The guilds of Lanmark elect a speaker for tariffs. The answer is a speaker."]]
    ctx = start_job(state, payload(document_id, rationales))
    result = run(ctx)
    assert run(ctx) == result  # a retried attempt reports the version it registered, trains nothing
    assert (result["rationales_written"], result["rationales_kept"], result["steps"]) == (3, 2, 3)
    with state.sessions() as session:
        adapter = resolve_alias(session, REASONER_ALIAS)
        assert (adapter.id, adapter.kind.value, adapter.lineage) == (result["adapter_id"], "reasoner", REASONER_ALIAS)
    response = client.post("/v1/query", json=body, headers=admin_headers(state))
    assert response.status_code == 200, response.json()
    answer = response.json()
    assert answer["adapters"]["reasoner"] == {"id": adapter.id, "name": REASONER_ALIAS, "version": 1}
    assert answer["adapters"]["km"] is None
    assert len(answer["passages"]) == 3 and answer["timings_ms"]["rerank"] > 0


def test_the_teacher_writes_n_rationales_per_question_told_the_gold_answer(state: AppState) -> None:
    engine = MagicMock(spec=Engine)
    engine.generate = AsyncMock(side_effect=lambda requests: [
        GenerationResult(r.request_id, f" rationale {i} ", "stop", Usage(1, 1), None) for i, r in enumerate(requests)])
    ctx = start_job(state, {"items": [{"document_id": 1, "question": RIVER.question, "answer": "Lanmark"}]})
    ctx.engine_provider = lambda: engine
    written = teacher_rationales(ctx, load_items(ctx), n=2, max_tokens=16)
    assert [r.text for r in written] == ["rationale 0", "rationale 1"]
    (requests,) = engine.generate.call_args.args
    assert all("The answer is Lanmark" in r.messages[0].content for r in requests)
    assert [r.sampling.seed for r in requests] == [0, 1] and requests[0].sampling.temperature > 0
