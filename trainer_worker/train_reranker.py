"""The `train_reranker` job (KARD): teach a MiniLM reranker to rank passages as the teacher's rationale would.

For every (question, rationale): candidates = top-`pool` passages by the question plus top-`pool` by the rationale;
target = softmax(cos(rationale, passage) / tau) with the bundled MiniLM; loss = KL(target || softmax(cos(q, p) / tau2))
where the reranker sees only the question. The reranker is a LoRA on MiniLM (see `engines.reranker`), registered as
kind `reranker`, lineage `reranker:<name>`, with alias `reranker:default` moved to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from engines.embedder import Embedder, bundled_model_path, shared_embedder
from engines.reranker import LORA_TARGETS, RERANKER_ALIAS, cosine_scores, load_minilm, minilm_name
from registry.adapters import AdapterCreate, register_adapter
from registry.aliases import set_alias
from registry.db import write_transaction
from registry.models import AdapterKind
from registry.vector_index import VectorIndex
from trainer_worker.context import JobContext, PermanentJobError
from trainer_worker.lora_training import adapter_tensors, peft_config_dict
from trainer_worker.rationales import Rationale, job_rationales, load_items
from trainer_worker.train_km import registered_earlier, verify_stored

if TYPE_CHECKING:
    import torch

MSG_FIELD = "RerankerConfig.{field} must be {requirement}, got {value!r}"
MSG_NO_CANDIDATES = "no training question has two or more candidate passages; index the documents first"


@dataclass
class RerankerConfig:
    """How the reranker is trained (LoRA on MiniLM's attention query/value projections)."""

    steps: int = 60
    lr: float = 5e-4
    rank: int = 8
    alpha: float = 16.0
    pool: int = 20
    tau: float = 0.1
    tau2: float = 0.1
    batch_size: int = 4
    n_rationales: int = 1
    rationale_tokens: int = 128
    name: str = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "pool", "batch_size", "n_rationales", "rationale_tokens"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                     getattr(self, name))
        for name in ("lr", "alpha", "tau", "tau2"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        _require(bool(self.name) and ":" not in self.name, "name", "a non-empty name without ':'", self.name)

    @classmethod
    def of(cls, payload: dict[str, Any]) -> RerankerConfig:
        """The config from a job payload's top-level keys (others ignored); bad values fail the job."""
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in payload.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise PermanentJobError(str(exc)) from exc


def _require(ok: bool, name: str, requirement: str, value: object) -> None:
    if not ok:
        raise ValueError(MSG_FIELD.format(field=name, requirement=requirement, value=value))


@dataclass(frozen=True)
class RerankExample:
    """A question, its candidate passages, and the target distribution over them."""

    question: str
    texts: tuple[str, ...]
    target: tuple[float, ...]


def target_distribution(relevances: Sequence[float], tau: float) -> tuple[float, ...]:
    """softmax(relevance / tau): KARD's target over the candidate passages (smaller tau = sharper)."""
    logits = [r / tau for r in relevances]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return tuple(w / total for w in weights)


def kl_loss(target: torch.Tensor, scores: torch.Tensor, tau2: float) -> torch.Tensor:
    """KL(target || softmax(scores / tau2))."""
    import torch

    log_probs = torch.log_softmax(scores / tau2, dim=0)
    return torch.sum(target * (torch.log(target.clamp(min=1e-12)) - log_probs))


def make_example(embedder: Embedder, question: str, rationale: str, texts: Sequence[str],
                 tau: float) -> RerankExample:
    """The example whose target is softmax(cos(rationale, passage) / tau) over `texts`."""
    rationale_vec, *vectors = embedder.embed([rationale, *texts])
    relevances = [sum(a * b for a, b in zip(rationale_vec, v, strict=True)) for v in vectors]
    return RerankExample(question, tuple(texts), target_distribution(relevances, tau))


def candidates(index: VectorIndex, embedder: Embedder, tenant: str, rationale: Rationale, pool: int) -> list[str]:
    """Top-`pool` passages by the question, then those the rationale adds (KARD's candidate set)."""
    question_vec, rationale_vec = embedder.embed([rationale.item.question, rationale.text])
    hits = [*index.search(tenant, [rationale.item.document_id], question_vec, pool),
            *index.search(tenant, [rationale.item.document_id], rationale_vec, pool)]
    return list(dict.fromkeys(hit.text for hit in hits))


def example_loss(model: Any, tokenizer: Any, example: RerankExample, tau2: float) -> torch.Tensor:
    """KL(target || softmax(reranker scores / tau2)) of one example."""
    import torch

    scores = cosine_scores(model, tokenizer, example.question, example.texts)
    return kl_loss(torch.tensor(example.target, device=scores.device), scores, tau2)


def mean_kl(model: Any, tokenizer: Any, examples: Sequence[RerankExample], tau2: float) -> float:
    """The mean KL over examples, without gradients."""
    import torch

    with torch.no_grad():
        return sum(float(example_loss(model, tokenizer, ex, tau2)) for ex in examples) / len(examples)


def lora_model(base: Any, config: RerankerConfig) -> Any:
    """MiniLM wrapped in a fresh, seeded LoRA (B = 0: it starts as exactly MiniLM)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    return get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                           target_modules=LORA_TARGETS, bias="none"))


def fit(model: Any, tokenizer: Any, examples: Sequence[RerankExample], config: RerankerConfig,
        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the LoRA with AdamW on mini-batches cycling over the examples; returns the loss per step."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    losses: list[float] = []
    model.train()
    for step in range(config.steps):
        batch = [examples[order[(step * config.batch_size + i) % len(order)]] for i in range(config.batch_size)]
        loss = torch.stack([example_loss(model, tokenizer, ex, config.tau2) for ex in batch]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


def build_examples(ctx: JobContext, config: RerankerConfig) -> list[RerankExample]:
    """Examples for every rationale of the job's items whose candidate set holds at least two passages."""
    items = load_items(ctx)
    rationales = [r for r in job_rationales(ctx, items, config.n_rationales, config.rationale_tokens) if r.text]
    embedder = shared_embedder(ctx.settings)
    with VectorIndex.open(ctx.settings) as index:
        pools = [(r, candidates(index, embedder, ctx.job.tenant, r, config.pool)) for r in rationales]
    examples = [make_example(embedder, r.item.question, r.text, texts, config.tau) for r, texts in pools
                if len(texts) >= 2]
    if not examples:
        raise PermanentJobError(MSG_NO_CANDIDATES)
    return examples


def publish(ctx: JobContext, model: Any, config: RerankerConfig, metrics: dict[str, Any]) -> tuple[int, int]:
    """Store the LoRA, register it as the next `reranker:<name>` version and move `reranker:default` to it."""
    tensors = adapter_tensors(model)
    stored = ctx.store.put(peft_config_dict(model, str(bundled_model_path())), tensors)
    verify_stored(ctx.store, stored.uri, tensors)
    tenant = ctx.job.tenant
    with write_transaction(ctx.sessions) as session:
        adapter = register_adapter(session, AdapterCreate.from_stored(
            stored, kind=AdapterKind.RERANKER, lineage=f"reranker:{config.name}", base_model=minilm_name(),
            tenant=tenant, metrics=metrics, config={"reranker": asdict(config)}, job_id=ctx.job.id))
        set_alias(session, RERANKER_ALIAS, adapter.id, tenant=tenant)
        return adapter.id, adapter.version


def run(ctx: JobContext) -> dict[str, Any]:
    """Handler of `train_reranker` jobs."""
    config = RerankerConfig.of(ctx.payload)
    if (earlier := registered_earlier(ctx, f"reranker:{config.name}", ctx.job.tenant)) is not None:
        return {"adapter_id": earlier.adapter_id, "version": earlier.version, "alias": RERANKER_ALIAS,
                **earlier.metrics}
    examples = build_examples(ctx, config)
    ctx.report(0.0, f"training the reranker on {len(examples)} questions ({config.steps} steps)")
    base, tokenizer = load_minilm()
    model = lora_model(base, config)
    kl_before = mean_kl(model, tokenizer, examples, config.tau2)
    losses = fit(model, tokenizer, examples, config,
                 lambda step, loss: ctx.report(step / config.steps, f"step {step}/{config.steps}", {"loss": loss}))
    metrics = {"kl_before": round(kl_before, 6), "kl_after": round(mean_kl(model, tokenizer, examples, config.tau2), 6),
               "loss_history": [round(x, 6) for x in losses], "examples": len(examples)}
    adapter_id, version = publish(ctx, model, config, metrics)
    return {"adapter_id": adapter_id, "version": version, "alias": RERANKER_ALIAS, **metrics}
