"""The KARD reranker: a MiniLM bi-encoder scoring passages by cosine similarity to the question.

Why a bi-encoder: it starts as exactly the bundled all-MiniLM-L6-v2 (mean pooling, L2-normalised), so an untrained
reranker already ranks like retrieval does, and training is a LoRA on its attention `query`/`value` projections that
the adapter store keeps in the same PEFT format as every other adapter. Scores are cos(q, p) / tau2; the temperature
matters for training only (it does not change the order).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.embedder import bundled_model_path, resolve_device

if TYPE_CHECKING:
    import torch
    from sqlalchemy.orm import Session, sessionmaker

    from registry.store import AdapterStore
    from registry.vector_layout import Passage

RERANKER_ALIAS = "reranker:default"
LORA_TARGETS = ["query", "value"]
MAX_TOKENS = 256
CACHED_RERANKERS = 2

_cache: OrderedDict[int | None, Reranker] = OrderedDict()
_cache_lock = threading.Lock()


def minilm_name(path: Path | None = None) -> str:
    """The base-model name a reranker adapter records: the MiniLM folder's name."""
    return (path or bundled_model_path()).name


def load_minilm(path: Path | None = None) -> tuple[Any, Any]:
    """A fresh MiniLM encoder (transformers BertModel, eval mode) and its tokenizer, from the local folder."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(path or bundled_model_path())
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(resolve_device("auto")).eval(), tokenizer


def encode(model: Any, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (as sentence-transformers computes them); keeps the graph."""
    import torch

    device = next(model.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def cosine_scores(model: Any, tokenizer: Any, question: str, texts: Sequence[str]) -> torch.Tensor:
    """cos(question, text) for every text, as a 1-d tensor (differentiable)."""
    vectors = encode(model, tokenizer, [question, *texts])
    return vectors[1:] @ vectors[0]


@dataclass
class Reranker:
    """A loaded reranker: MiniLM, with a trained LoRA when `adapter_id` is set."""

    model: Any
    tokenizer: Any
    adapter_id: int | None = None

    def __post_init__(self) -> None:
        # One forward at a time: the fast tokenizer is not safe to share across threads.
        self._lock = threading.Lock()

    def scores(self, question: str, texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each text to the question under this reranker."""
        import torch

        if not texts:
            return []
        with self._lock, torch.no_grad():
            return [float(s) for s in cosine_scores(self.model, self.tokenizer, question, texts)]

    def rerank(self, question: str, passages: Sequence[Passage], top_k: int) -> list[Passage]:
        """The `top_k` passages with the highest reranker score, best first, scored by the reranker."""
        scored = zip(self.scores(question, [p.text for p in passages]), passages, strict=True)
        ranked = sorted(scored, key=lambda pair: pair[0], reverse=True)[:top_k]
        return [replace(passage, score=score) for score, passage in ranked]


def load_reranker(adapter_dir: Path | None = None, adapter_id: int | None = None) -> Reranker:
    """MiniLM with the LoRA in `adapter_dir` merged in (plain MiniLM when None)."""
    model, tokenizer = load_minilm()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    return Reranker(model, tokenizer, adapter_id)


def cached_reranker(adapter_id: int | None, adapter_dir: Path | None) -> Reranker:
    """The process's loaded reranker for this adapter version (a small LRU; None = plain MiniLM)."""
    with _cache_lock:
        if adapter_id in _cache:
            _cache.move_to_end(adapter_id)
            return _cache[adapter_id]
    reranker = load_reranker(adapter_dir, adapter_id)
    with _cache_lock:
        _cache[adapter_id] = reranker
        while len(_cache) > CACHED_RERANKERS:
            _cache.popitem(last=False)
    return reranker


@dataclass(frozen=True)
class RerankerRef:
    """The reranker version an alias points at."""

    id: int
    lineage: str
    version: int
    uri: str


def resolve_reranker(sessions: sessionmaker[Session], tenant: str) -> RerankerRef | None:
    """The adapter alias `reranker:default` points at for the tenant, or None when none was trained."""
    from registry.aliases import resolve_alias
    from registry.errors import NotFoundError

    with sessions() as session:
        try:
            adapter = resolve_alias(session, RERANKER_ALIAS, tenant=tenant)
        except NotFoundError:
            return None
        return RerankerRef(adapter.id, adapter.lineage, adapter.version, adapter.uri)


def reranker_for(sessions: sessionmaker[Session], store: AdapterStore, tenant: str) -> tuple[Reranker, RerankerRef
                                                                                              | None]:
    """The tenant's reranker (trained, else plain MiniLM) and the version it runs."""
    ref = resolve_reranker(sessions, tenant)
    if ref is None:
        return cached_reranker(None, None), None
    with _cache_lock:
        cached = _cache.get(ref.id)
    # The store checks the adapter's checksums when it is opened; only done when it is not loaded yet.
    return cached or cached_reranker(ref.id, store.open(ref.uri)), ref
