"""The `train_compressor` job: train a RECOMP compressor, register it as kind `compressor` and move its alias.

Payload: `method` ("extractive" or "abstractive"), `items` ([{document_id, question, answer}]) or `items_uri`
(a JSONL blob), and optional `top_k` (passages retrieved per item), `steps`, `rank`, `lr`, `max_summary_tokens`.
Extractive: a LoRA (query, value) on the MiniLM BertModel, trained contrastively (InfoNCE, question vs the sentence
that most raises the generator's answer likelihood, against the item's other sentences). Abstractive: a LoRA on the
generator trained with next-token loss on (passages + question -> selectively-kept teacher summary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.compressor import ABSTRACTIVE_LINEAGE, BERT_LORA_TARGETS, EXTRACTIVE_LINEAGE, abstractive_prompt
from registry.adapters import AdapterCreate, register_adapter
from registry.aliases import set_alias
from registry.db import write_transaction
from registry.models import AdapterKind
from trainer_worker.checkpoint import remove_checkpoints
from trainer_worker.compressor_data import (
    CompressorItem,
    ContrastiveExample,
    contrastive_example,
    parse_items,
    summary_target,
    with_passages,
)
from trainer_worker.context import JobContext, PermanentJobError
from trainer_worker.km_data import DcdExample, ExampleDeck, KmData, chat_prefix, encode
from trainer_worker.lora_training import adapter_tensors, peft_config_dict
from trainer_worker.train_config import profile_config
from trainer_worker.train_km import MODEL_LOCK, base_model, served_model_name, train, verify_stored

if TYPE_CHECKING:
    import torch

METHODS = ("extractive", "abstractive")
INFONCE_TEMPERATURE = 0.05
MSG_METHOD = "train_compressor method must be one of extractive, abstractive; got {value!r}"
MSG_OPTION = "train_compressor option {name} must be {requirement}, got {value!r}"
MSG_NO_CONTRAST = "no item has two or more sentences in its passages to contrast; add items or raise top_k"


@dataclass(frozen=True)
class CompressorConfig:
    """Options of one compressor run."""

    method: str
    top_k: int = 5
    steps: int = 20
    rank: int = 8
    lr: float = 2e-4
    max_summary_tokens: int = 48
    seed: int = 0

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> CompressorConfig:
        """The run's options; a bad value fails the job for good."""
        method = payload.get("method", (payload.get("train") or {}).get("method"))
        if method not in METHODS:
            raise PermanentJobError(MSG_METHOD.format(value=method))
        options = {name: payload[name] for name in ("top_k", "steps", "rank", "max_summary_tokens", "seed")
                   if payload.get(name) is not None}
        for name, value in options.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise PermanentJobError(MSG_OPTION.format(name=name, requirement="a positive integer", value=value))
        lr = payload.get("lr", cls.lr)
        if not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0:
            raise PermanentJobError(MSG_OPTION.format(name="lr", requirement="a number > 0", value=lr))
        return cls(method=method, lr=float(lr), **options)


def _embedder_path(ctx: JobContext) -> str:
    from engines.embedder import bundled_model_path

    return str(ctx.settings.embedding_model or bundled_model_path())


def _mean_pooled(bert: Any, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    import torch

    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    batch = {k: v.to(next(bert.parameters()).device) for k, v in batch.items()}
    hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def infonce_loss(bert: Any, tokenizer: Any, example: ContrastiveExample) -> torch.Tensor:
    """Cross-entropy of the positive among [positive, negatives] by cosine(question, sentence) / temperature."""
    import torch

    question = _mean_pooled(bert, tokenizer, [example.question])
    sentences = _mean_pooled(bert, tokenizer, [example.positive, *example.negatives])
    logits = (question @ sentences.T) / INFONCE_TEMPERATURE
    return torch.nn.functional.cross_entropy(logits, torch.zeros(1, dtype=torch.long, device=logits.device))


def _contrastive_examples(ctx: JobContext, items: Sequence[CompressorItem]) -> list[ContrastiveExample]:
    base, tokenizer = base_model(_generator_id(ctx))
    with MODEL_LOCK:
        examples = [contrastive_example(base, tokenizer, item) for item in items]
    kept = [example for example in examples if example is not None]
    if not kept:
        raise PermanentJobError(MSG_NO_CONTRAST)
    return kept


def _generator_id(ctx: JobContext) -> str:
    from engines.factory import resolve_base_model

    return resolve_base_model(ctx.settings)


@dataclass
class Trained:
    """A trained compressor LoRA: PEFT config, tensors, and what to record."""

    peft_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    base_model: str
    metrics: dict[str, Any]


def train_extractive(ctx: JobContext, config: CompressorConfig, examples: Sequence[ContrastiveExample]) -> Trained:
    """Fine-tune a LoRA on the MiniLM encoder so the question ranks each item's positive sentence first."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engines.embedder import load_sentence_transformer, resolve_device

    path = _embedder_path(ctx)
    encoder = load_sentence_transformer(Path(path), resolve_device(ctx.settings.embedding_device))
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.rank, lora_dropout=0.05,
                      target_modules=list(BERT_LORA_TARGETS), bias="none")
    model = get_peft_model(encoder[0].auto_model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    losses = []
    model.train()
    for step in range(config.steps):
        loss = infonce_loss(model, encoder.tokenizer, examples[step % len(examples)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss.detach()), 6))
        ctx.report((step + 1) / config.steps, f"training extractive compressor: step {step + 1}/{config.steps}",
                   {"loss": losses[-10:], "step": step + 1, "steps": config.steps})
    metrics = {"loss_history": losses, "examples": len(examples), "steps": config.steps}
    return Trained(peft_config_dict(model, path), adapter_tensors(model), path, metrics)


def summary_examples(tokenizer: Any, items: Sequence[CompressorItem], targets: Sequence[str]) -> list[DcdExample]:
    """LM examples chat(passages + instruction) -> target + EOS; an empty target teaches an empty summary."""
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    examples = []
    for item, target in zip(items, targets, strict=True):
        ids = tuple(chat_prefix(tokenizer, abstractive_prompt(item.question, item.passages)))
        target_ids = tuple(encode(tokenizer, target) + eos) if target else tuple(eos)
        if target_ids:
            examples.append(DcdExample(ids + target_ids, ids + target_ids, len(target_ids)))
    return examples


def train_abstractive(ctx: JobContext, config: CompressorConfig, items: Sequence[CompressorItem]) -> Trained:
    """Label items with selectively-kept teacher summaries, then train the generator LoRA on them (LM loss)."""
    model_id = _generator_id(ctx)
    base, tokenizer = base_model(model_id)
    with MODEL_LOCK:
        targets = [summary_target(base, tokenizer, item, config.max_summary_tokens) for item in items]
    examples = summary_examples(tokenizer, items, targets)
    dev = examples[-max(1, len(examples) // 5):]
    train_config = profile_config("fast", {"method": "lm", "steps": config.steps, "rank": config.rank,
                                           "lr": config.lr, "seed": config.seed, "eval_every": config.steps,
                                           "checkpoint_every": config.steps, "batch_size": 2, "grad_accum": 1})
    outcome = train(ctx, base, tokenizer, KmData(ExampleDeck(examples), dev), train_config, model_id)
    kept = sum(1 for target in targets if target)
    metrics = {"loss_history": [round(x, 6) for x in outcome.state.losses], "examples": len(examples),
               "summaries_kept": kept, "summaries_dropped": len(targets) - kept,
               "best_dev_loss": outcome.state.best_dev_loss, "steps": outcome.state.step}
    return Trained(outcome.peft_config, outcome.best_adapter, served_model_name(ctx.settings), metrics)


def publish(ctx: JobContext, config: CompressorConfig, trained: Trained) -> tuple[int, int]:
    """Store and verify the adapter, register the next `compressor:<method>` version and move the alias to it."""
    stored = ctx.store.put(trained.peft_config, trained.tensors)
    verify_stored(ctx.store, stored.uri, trained.tensors)
    lineage = EXTRACTIVE_LINEAGE if config.method == "extractive" else ABSTRACTIVE_LINEAGE
    tenant = ctx.job.tenant
    with write_transaction(ctx.sessions) as session:
        data = AdapterCreate.from_stored(
            stored, kind=AdapterKind.COMPRESSOR, lineage=lineage, base_model=trained.base_model, tenant=tenant,
            metrics=trained.metrics, config={"method": config.method, "train": asdict(config)},
        )
        adapter = register_adapter(session, data)
        set_alias(session, lineage, adapter.id, tenant=tenant)
        return adapter.id, adapter.version


def run(ctx: JobContext) -> dict[str, Any]:
    """Handler of `train_compressor` jobs."""
    config = CompressorConfig.of(ctx.payload)
    items = with_passages(ctx.settings, ctx.job.tenant, parse_items(ctx.payload, ctx.store), config.top_k)
    ctx.report(0.0, f"labelling {len(items)} items for the {config.method} compressor")
    if config.method == "extractive":
        trained = train_extractive(ctx, config, _contrastive_examples(ctx, items))
    else:
        trained = train_abstractive(ctx, config, items)
    adapter_id, version = publish(ctx, config, trained)
    remove_checkpoints(ctx.checkpoint_dir)
    lineage = EXTRACTIVE_LINEAGE if config.method == "extractive" else ABSTRACTIVE_LINEAGE
    return {"adapter_id": adapter_id, "version": version, "alias": lineage, "method": config.method,
            **{k: v for k, v in trained.metrics.items() if k != "loss_history"}}
