"""The compressor jobs: train a RECOMP compressor, register it as kind `compressor` and move its alias.

Kinds `train_compressor_extractive` and `train_compressor_abstractive`; `train_compressor` takes the method from
the payload's `method`. Payload: `items` ([{document_id, question, answer}]) or `items_uri` (a JSONL blob), and
optional `top_k` (passages retrieved per item), `steps`, `rank`, `lr`, `seed`; extractive `epsilon`, `batch_size`;
abstractive `max_summary_tokens`, `n_candidates`.
Extractive: a LoRA (query, value) on the MiniLM BertModel, trained contrastively (InfoNCE of the question against
the sentence that most raises the generator's answer log-likelihood, with the item's hard negatives and every other
item's sentences in the batch as negatives). Abstractive: a LoRA on the generator trained with next-token loss on
(passages + question -> the best of n teacher summaries, or "" when none beats closed-book).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
from trainer_worker.train_config import profile_config, resolve_profile
from trainer_worker.train_km import (
    MODEL_LOCK,
    base_model,
    registered_earlier,
    served_model_name,
    train,
    verify_stored,
)

if TYPE_CHECKING:
    import torch

METHODS = ("extractive", "abstractive")
INT_OPTIONS = ("top_k", "steps", "rank", "max_summary_tokens", "seed", "batch_size", "n_candidates")
PAPER_CANDIDATES, FAST_CANDIDATES = 4, 2
INFONCE_TEMPERATURE = 0.05
MSG_METHOD = "train_compressor method must be one of extractive, abstractive; got {value!r}"
MSG_OPTION = "train_compressor option {name} must be {requirement}, got {value!r}"
MSG_NO_CONTRAST = (
    "no item has a sentence scoring more than epsilon below its best to contrast; add items, raise top_k or lower "
    "epsilon"
)


@dataclass(frozen=True)
class CompressorConfig:
    """Options of one compressor run; `n_candidates` None = by training profile (paper 4, fast 2)."""

    method: str
    top_k: int = 5
    steps: int = 20
    rank: int = 8
    lr: float = 2e-4
    max_summary_tokens: int = 48
    seed: int = 0
    epsilon: float = 0.1
    batch_size: int = 4
    n_candidates: int | None = None

    @classmethod
    def of(cls, payload: Mapping[str, Any], method: str | None = None) -> CompressorConfig:
        """The run's options (`method` given by the job kind wins); a bad value fails the job for good."""
        method = method or payload.get("method", (payload.get("train") or {}).get("method"))
        if method not in METHODS:
            raise PermanentJobError(MSG_METHOD.format(value=method))
        options = {name: payload[name] for name in INT_OPTIONS if payload.get(name) is not None}
        for name, value in options.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise PermanentJobError(MSG_OPTION.format(name=name, requirement="a positive integer", value=value))
        lr = _number(payload, "lr", cls.lr, "a number > 0", lambda x: x > 0)
        epsilon = _number(payload, "epsilon", cls.epsilon, "a number >= 0", lambda x: x >= 0)
        return cls(method=method, lr=lr, epsilon=epsilon, **options)

    def candidates(self, profile: str) -> int:
        """Teacher summaries per item: the option, else 4 under the paper profile and 2 under fast."""
        return self.n_candidates or (PAPER_CANDIDATES if profile == "paper" else FAST_CANDIDATES)


def _number(payload: Mapping[str, Any], name: str, default: float, requirement: str,
            valid: Callable[[float], bool]) -> float:
    value = payload.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not valid(value):
        raise PermanentJobError(MSG_OPTION.format(name=name, requirement=requirement, value=value))
    return float(value)


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


def in_batch_layout(batch: Sequence[ContrastiveExample]) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """Every sentence of the batch, each question's positive among them, and (question, sentence) pairs to mask:
    another item's copy of a question's own positive is no negative."""
    texts: list[str] = []
    targets: list[int] = []
    for example in batch:
        targets.append(len(texts))
        texts.extend([example.positive, *example.negatives])
    masked = [(q, j) for q, example in enumerate(batch) for j, text in enumerate(texts)
              if text == example.positive and j != targets[q]]
    return texts, targets, masked


def contrastive_loss(questions: torch.Tensor, sentences: torch.Tensor, targets: Sequence[int],
                     masked: Sequence[tuple[int, int]], temperature: float = INFONCE_TEMPERATURE) -> torch.Tensor:
    """Mean cross-entropy of each question's positive among all batch sentences by cosine / temperature."""
    import torch

    logits = (questions @ sentences.T) / temperature
    for q, j in masked:
        logits[q, j] = float("-inf")
    labels = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, labels)


def batch_loss(bert: Any, tokenizer: Any, batch: Sequence[ContrastiveExample]) -> torch.Tensor:
    """The contrastive loss of a batch: each item's own negatives plus every other item's sentences."""
    texts, targets, masked = in_batch_layout(batch)
    questions = _mean_pooled(bert, tokenizer, [example.question for example in batch])
    return contrastive_loss(questions, _mean_pooled(bert, tokenizer, texts), targets, masked)


def _contrastive_examples(ctx: JobContext, config: CompressorConfig,
                          items: Sequence[CompressorItem]) -> tuple[list[ContrastiveExample], int]:
    from engines.embedder import shared_embedder

    base, tokenizer = base_model(_generator_id(ctx))
    encoder = shared_embedder(ctx.settings)
    with MODEL_LOCK:
        examples = [contrastive_example(base, tokenizer, encoder, item, config.epsilon) for item in items]
    kept = [example for example in examples if example is not None]
    if not kept:
        raise PermanentJobError(MSG_NO_CONTRAST)
    return kept, len(examples) - len(kept)


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


def train_extractive(ctx: JobContext, config: CompressorConfig, items: Sequence[CompressorItem]) -> Trained:
    """Fine-tune a LoRA on the MiniLM encoder so the question ranks each item's positive sentence first."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engines.embedder import load_sentence_transformer, resolve_device

    examples, skipped = _contrastive_examples(ctx, config, items)
    path = _embedder_path(ctx)
    encoder = load_sentence_transformer(Path(path), resolve_device(ctx.settings.embedding_device))
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.rank, lora_dropout=0.05,
                      target_modules=list(BERT_LORA_TARGETS), bias="none")
    model = get_peft_model(encoder[0].auto_model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    losses = []
    model.train()
    size = min(config.batch_size, len(examples))
    for step in range(config.steps):
        batch = [examples[(step * size + i) % len(examples)] for i in range(size)]
        loss = batch_loss(model, encoder.tokenizer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss.detach()), 6))
        ctx.report((step + 1) / config.steps, f"training extractive compressor: step {step + 1}/{config.steps}",
                   {"loss": losses[-10:], "step": step + 1, "steps": config.steps})
    metrics = {"loss_history": losses, "examples": len(examples), "skipped_no_negative": skipped,
               "steps": config.steps}
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
        n = config.candidates(_profile(ctx))
        targets = [summary_target(base, tokenizer, item, config.max_summary_tokens, n) for item in items]
    examples = summary_examples(tokenizer, items, targets)
    dev = examples[-max(1, len(examples) // 5):]
    train_config = profile_config("fast", {"method": "lm", "steps": config.steps, "rank": config.rank,
                                           "lr": config.lr, "seed": config.seed, "eval_every": config.steps,
                                           "checkpoint_every": config.steps, "batch_size": 2, "grad_accum": 1})
    outcome = train(ctx, base, tokenizer, KmData(ExampleDeck(examples), dev), train_config, model_id)
    kept = sum(1 for target in targets if target)
    metrics = {"loss_history": [round(x, 6) for x in outcome.state.losses], "examples": len(examples),
               "n_candidates": n, "summaries_kept": kept, "summaries_dropped": len(targets) - kept,
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
            job_id=ctx.job.id,
        )
        adapter = register_adapter(session, data)
        set_alias(session, lineage, adapter.id, tenant=tenant)
        return adapter.id, adapter.version


def _profile(ctx: JobContext) -> str:
    import torch

    return resolve_profile(ctx.settings.train_profile, "cuda" if torch.cuda.is_available() else "cpu")


def run_extractive(ctx: JobContext) -> dict[str, Any]:
    """Handler of `train_compressor_extractive` jobs."""
    return run(ctx, "extractive")


def run_abstractive(ctx: JobContext) -> dict[str, Any]:
    """Handler of `train_compressor_abstractive` jobs."""
    return run(ctx, "abstractive")


def run(ctx: JobContext, method: str | None = None) -> dict[str, Any]:
    """Handler of `train_compressor` jobs (payload `method`), and of the per-method kinds."""
    config = CompressorConfig.of(ctx.payload, method)
    lineage = EXTRACTIVE_LINEAGE if config.method == "extractive" else ABSTRACTIVE_LINEAGE
    if (earlier := registered_earlier(ctx, lineage, ctx.job.tenant)) is not None:
        adapter_id, version, metrics = earlier.adapter_id, earlier.version, earlier.metrics
    else:
        items = with_passages(ctx.settings, ctx.job.tenant, parse_items(ctx.payload, ctx.store), config.top_k)
        ctx.report(0.0, f"labelling {len(items)} items for the {config.method} compressor")
        if config.method == "extractive":
            trained = train_extractive(ctx, config, items)
        else:
            trained = train_abstractive(ctx, config, items)
        (adapter_id, version), metrics = publish(ctx, config, trained), trained.metrics
        remove_checkpoints(ctx.checkpoint_dir)
    return {"adapter_id": adapter_id, "version": version, "alias": lineage, "method": config.method,
            **{k: v for k, v in metrics.items() if k != "loss_history"}}
