"""The `train_reasoner` job (KARD reasoning distillation): a LoRA on the generator that writes rationales.

The teacher (base generator, told the gold answer) writes `n_rationales` per training question, or the payload gives
them (`rationales`); only those whose final answer contains the gold answer are kept. Each kept rationale retrieves
`top_k` passages of its document (the rationale as the query), and the LoRA learns, by next-token loss on the target
only, passages + question -> rationale + "Answer: <gold>". Registered as kind `reasoner`, lineage `reasoner:<name>`,
with alias `reasoner:default` moved to it; `/v1/query` with `reason: true` serves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from engines.embedder import shared_embedder
from engines.factory import resolve_base_model
from engines.hf_loading import resolve_device
from engines.reasoning import REASONER_ALIAS, reasoner_prompt, reasoner_target
from registry.adapters import AdapterCreate, register_adapter
from registry.aliases import set_alias
from registry.db import write_transaction
from registry.models import AdapterKind
from registry.vector_index import VectorIndex
from trainer_worker.checkpoint import remove_checkpoints
from trainer_worker.context import JobContext, PermanentJobError
from trainer_worker.km_data import DcdExample, ExampleDeck, KmData, chat_prefix, encode
from trainer_worker.rationales import Rationale, job_rationales, keep_correct, load_items
from trainer_worker.train_config import TrainConfig
from trainer_worker.train_km import (
    TrainOutcome,
    base_model,
    job_config,
    registered_earlier,
    served_model_name,
    train,
    verify_stored,
)

MSG_NONE_KEPT = "no rationale leads to the gold answer ({total} written for {items} questions); nothing to train " \
                "the reasoner on. Give better rationales ('rationales') or more rationales per question."
DEV_HOLDOUT_MIN = 10
MAX_DEV = 8


def passages_for(index: VectorIndex | None, tenant: str, rationale: Rationale, top_k: int,
                 vector: list[float] | None) -> list[str]:
    """The document's passages nearest the rationale, best last (as the query pipeline orders them)."""
    if index is None or vector is None:
        return []
    hits = index.search(tenant, [rationale.item.document_id], vector, top_k)
    return [hit.text for hit in reversed(hits)]


def retrieve_all(ctx: JobContext, rationales: Sequence[Rationale], top_k: int) -> list[list[str]]:
    """Passages for every rationale (none when top_k is 0)."""
    if top_k == 0:
        return [[] for _ in rationales]
    vectors = shared_embedder(ctx.settings).embed([r.text for r in rationales])
    with VectorIndex.open(ctx.settings) as index:
        return [passages_for(index, ctx.job.tenant, r, top_k, v) for r, v in zip(rationales, vectors, strict=True)]


def reasoner_example(tokenizer: Any, rationale: Rationale, passages: Sequence[str],
                     config: TrainConfig) -> DcdExample:
    """chat(passages + question) + rationale + answer; both sides equal, the loss falls on the target only."""
    target = tuple(encode(tokenizer, reasoner_target(rationale.text, rationale.item.answer))
                   [:config.max_target_tokens])
    ids = tuple(chat_prefix(tokenizer, reasoner_prompt(rationale.item.question, passages))) + target
    return DcdExample(ids, ids, len(target))


def reasoner_data(examples: list[DcdExample]) -> KmData:
    """Training deck and dev set: a held-out tail when there are enough examples, else the examples themselves."""
    if len(examples) >= DEV_HOLDOUT_MIN:
        n_dev = min(MAX_DEV, len(examples) // 10)
        return KmData(ExampleDeck(examples[:-n_dev]), examples[-n_dev:])
    # Too few to hold any out: the dev loss then tracks the fit to the kept rationales.
    return KmData(ExampleDeck(examples), examples[:MAX_DEV])


def kept_rationales(ctx: JobContext) -> tuple[list[Rationale], int]:
    """The rationales that lead to the gold answer, and how many were written."""
    items = load_items(ctx)
    n = int(ctx.payload.get("n_rationales", 3))
    written = job_rationales(ctx, items, n, int(ctx.payload.get("rationale_tokens", 256)))
    kept = keep_correct(written)
    if not kept:
        raise PermanentJobError(MSG_NONE_KEPT.format(total=len(written), items=len(items)))
    return kept, len(written)


def publish(ctx: JobContext, outcome: TrainOutcome, name: str, metrics: dict[str, Any],
            config: TrainConfig) -> tuple[int, int]:
    """Store and verify the LoRA, register it as the next `reasoner:<name>` version, move `reasoner:default`."""
    stored = ctx.store.put(outcome.peft_config, outcome.best_adapter)
    verify_stored(ctx.store, stored.uri, outcome.best_adapter)
    tenant = ctx.job.tenant
    with write_transaction(ctx.sessions) as session:
        adapter = register_adapter(session, AdapterCreate.from_stored(
            stored, kind=AdapterKind.REASONER, lineage=f"reasoner:{name}", base_model=served_model_name(ctx.settings),
            tenant=tenant, metrics=metrics, config={"train": asdict(config)}, job_id=ctx.job.id))
        set_alias(session, REASONER_ALIAS, adapter.id, tenant=tenant)
        return adapter.id, adapter.version


def run(ctx: JobContext) -> dict[str, Any]:
    """Handler of `train_reasoner` jobs."""
    config, profile = job_config({**ctx.payload, "method": "lm"}, ctx.settings, resolve_device().type)
    name = str(ctx.payload.get("name", "default"))
    if (earlier := registered_earlier(ctx, f"reasoner:{name}", ctx.job.tenant)) is not None:
        return {"adapter_id": earlier.adapter_id, "version": earlier.version, "alias": REASONER_ALIAS,
                **earlier.metrics}
    kept, written = kept_rationales(ctx)
    passages = retrieve_all(ctx, kept, int(ctx.payload.get("top_k", 3)))
    model_id = resolve_base_model(ctx.settings)
    base, tokenizer = base_model(model_id)
    examples = [reasoner_example(tokenizer, r, p, config) for r, p in zip(kept, passages, strict=True)]
    ctx.report(0.0, f"training the reasoner on {len(kept)} of {written} rationales ({config.steps} steps)")
    outcome = train(ctx, base, tokenizer, reasoner_data(examples), config, model_id)
    metrics = {"rationales_written": written, "rationales_kept": len(kept), "profile": profile,
               "loss_history": [round(x, 6) for x in outcome.state.losses],
               "best_dev_loss": outcome.state.best_dev_loss, "steps": outcome.state.step}
    adapter_id, version = publish(ctx, outcome, name, metrics, config)
    remove_checkpoints(ctx.checkpoint_dir)
    return {"adapter_id": adapter_id, "version": version, "alias": REASONER_ALIAS, **metrics}
