"""The KARD reranker: training pulls it toward the rationale's ranking, the job registers it, /v1/query reranks."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
import torch
from fastapi.testclient import TestClient

from engines.embedder import Embedder, shared_embedder
from engines.indexing import index_document
from engines.reranker import RERANKER_ALIAS, cosine_scores, load_minilm
from registry.aliases import resolve_alias
from registry.config import Settings
from registry.models import DEFAULT_TENANT
from server.state import AppState
from tests.served import admin_headers, register_km_versions
from tests.tiny import save_lora_for
from trainer_worker.artifacts import Chunk
from trainer_worker.context import JobContext
from trainer_worker.train_reranker import (
    RerankerConfig,
    RerankExample,
    fit,
    kl_loss,
    lora_model,
    make_example,
    mean_kl,
    target_distribution,
)
from trainer_worker.train_reranker import run as run_reranker_job

torch.set_num_threads(2)
TEXTS = [
    "The Varo river flows north through the capital city of Lanmark before it reaches the sea.",
    "Bread in the hill villages is baked with barley flour and honey for the winter festival.",
    "The observatory on Mount Tessel tracks comets and publishes a star catalogue every year.",
    "The trade guilds of Lanmark elect a speaker who negotiates tariffs with neighbouring ports.",
    "Glass makers on the island of Perrin colour their vases with cobalt from the eastern mines.",
    "Every spring the ferry to Perrin is repainted in the colours of the harbour master.",
]
# Questions whose rationale leans on a passage the question alone does not rank first.
CASES = [
    ("Which city does the Varo river flow through?",
     "The capital's trade guilds elect a speaker for tariffs with ports, so the city is Lanmark.", 3),
    ("What is baked for the winter festival?",
     "Comets are tracked from Mount Tessel observatory, whose star catalogue names the festival.", 2),
    ("What colour is the Perrin ferry?",
     "Cobalt from the eastern mines colours the glass vases of Perrin, and the ferry is blue.", 4),
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return shared_embedder(Settings())


def rank_of(model: Any, tokenizer: Any, example: RerankExample, index: int) -> int:
    with torch.no_grad():
        scores = cosine_scores(model, tokenizer, example.question, example.texts)
    return int((scores > scores[index]).sum())


def test_training_moves_the_reranker_toward_the_rationale_target(embedder: Embedder) -> None:
    examples = [make_example(embedder, q, r, TEXTS, tau=0.05) for q, r, _ in CASES]
    for (_, _, best), example in zip(CASES, examples, strict=True):
        assert max(range(len(TEXTS)), key=lambda i: example.target[i]) == best
    config = RerankerConfig(steps=12, lr=3e-3, batch_size=3, tau2=0.05)
    base, tokenizer = load_minilm()
    model = lora_model(base, config)
    before_kl = mean_kl(model, tokenizer, examples, config.tau2)
    before = [rank_of(model, tokenizer, ex, best) for ex, (_, _, best) in zip(examples, CASES, strict=True)]
    losses = fit(model, tokenizer, examples, config)
    after_kl = mean_kl(model, tokenizer, examples, config.tau2)
    after = [rank_of(model, tokenizer, ex, best) for ex, (_, _, best) in zip(examples, CASES, strict=True)]
    print({"kl_before": before_kl, "kl_after": after_kl, "rank_before": before, "rank_after": after})
    assert after_kl < 0.5 * before_kl
    assert all(b > 0 for b in before) and all(a < b for a, b in zip(after, before, strict=True))
    assert len(losses) == 12


def indexed_document(state: AppState, tiny_model_dir: Path, tmp_path: Path) -> int:
    """A document with a KM whose retrieval chunks (TEXTS) are indexed."""
    lora = save_lora_for(tiny_model_dir, tmp_path / "km", seed=0)
    document_id = register_km_versions(state, [lora], text="reranker doc").document_id
    chunks = [Chunk(i, text, 20 * i, 20 * i + 20) for i, text in enumerate(TEXTS)]
    index_document(state.settings, DEFAULT_TENANT, document_id, chunks)
    return document_id


def start_job(state: AppState, kind: str, payload: dict[str, Any]) -> JobContext:
    """A claimed job of `kind` in the app's queue, as a worker would run it (no engine: rationales are inline)."""
    state.queue.enqueue(kind, payload)
    job = state.queue.claim("w1", [kind])
    assert job is not None
    return JobContext(job=job, worker_id="w1", queue=state.queue, sessions=state.sessions, store=state.store,
                      settings=state.settings, engine_provider=MagicMock(spec=Callable, side_effect=AssertionError))


def test_the_job_registers_a_reranker_that_the_rerank_stage_uses(
    client: TestClient, state: AppState, tiny_model_dir: Path, tmp_path: Path
) -> None:
    document_id = indexed_document(state, tiny_model_dir, tmp_path)
    items = [{"document_id": document_id, "question": q, "answer": "x"} for q, _, _ in CASES]
    payload = {"items": items, "rationales": [r for _, r, _ in CASES], "steps": 4, "pool": 3}
    ctx = start_job(state, "train_reranker", payload)
    result = run_reranker_job(ctx)
    assert result["kl_after"] < result["kl_before"] and result["examples"] == 3
    assert run_reranker_job(ctx) == result  # a retried attempt reports the registered version, trains nothing
    with state.sessions() as session:
        adapter = resolve_alias(session, RERANKER_ALIAS)
        assert adapter.id == result["adapter_id"]
        assert (adapter.kind.value, adapter.lineage) == ("reranker", "reranker:default")
    body = {"document_id": document_id, "question": CASES[0][0], "max_tokens": 4,
            "rag": {"top_k": 2, "pool": 6, "rerank": True}}
    response = client.post("/v1/query", json=body, headers=admin_headers(state))
    assert response.status_code == 200, response.json()
    answer = response.json()
    assert len(answer["passages"]) == 2 and answer["timings_ms"]["rerank"] > 0
    assert answer["adapters"]["reranker"] == {"id": adapter.id, "name": "reranker:default", "version": 1}


def test_target_distribution_is_a_softmax_that_tau_sharpens() -> None:
    relevances = [0.2, 0.9, 0.5]
    soft, sharp = target_distribution(relevances, tau=1.0), target_distribution(relevances, tau=0.1)
    for target in (soft, sharp):
        assert sum(target) == pytest.approx(1.0)
        assert sorted(range(3), key=target.__getitem__) == [0, 2, 1]  # the order of the relevances
    assert sharp[1] > soft[1] and sharp[0] < soft[0]
    weights = [math.exp(r / 0.5) for r in relevances]
    assert target_distribution(relevances, tau=0.5) == pytest.approx([w / sum(weights) for w in weights])


def test_kl_loss_matches_a_hand_computation() -> None:
    target = [0.7, 0.2, 0.1]
    scores = [0.3, 0.1, -0.2]
    tau2 = 0.5
    exps = [math.exp(s / tau2) for s in scores]
    predicted = [e / sum(exps) for e in exps]
    expected = sum(t * math.log(t / p) for t, p in zip(target, predicted, strict=True))
    loss = kl_loss(torch.tensor(target), torch.tensor(scores), tau2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(kl_loss(torch.tensor(predicted), torch.tensor(scores), tau2)) == pytest.approx(0.0, abs=1e-6)
