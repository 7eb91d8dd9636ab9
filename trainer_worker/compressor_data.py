"""Training data of the RECOMP compressors: items, their retrieved passages, and labels from the generator.

Labels come from the base generator's log-likelihood of the gold answer under the serving prompt: the extractive
positive is the sentence that raises it most; an abstractive summary is kept only when it raises it above the
closed-book prompt, else its target is "" (selective augmentation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.compressor import abstractive_prompt, candidate_sentences, context_prompt
from trainer_worker.context import PermanentJobError
from trainer_worker.km_data import chat_prefix, encode

if TYPE_CHECKING:
    from registry.config import Settings
    from registry.store import AdapterStore

MSG_ITEMS = "train_compressor needs items: a list of {document_id, question, answer} or items_uri (JSONL); {detail}"
MSG_NO_PASSAGES = "no item has retrieved passages; index the documents (ingest) before training a compressor"


@dataclass(frozen=True)
class CompressorItem:
    """A training question about a document, its gold answer, and the passages retrieval gives it (best last)."""

    document_id: int
    question: str
    answer: str
    passages: tuple[str, ...] = ()


def _item(record: Any) -> CompressorItem:
    if not isinstance(record, Mapping) or not isinstance(record.get("document_id"), int):
        raise ValueError("each item must be an object with an integer document_id")
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question or not isinstance(answer, str) or not answer:
        raise ValueError("each item needs a non-empty question and answer")
    return CompressorItem(record["document_id"], question, answer)


def parse_items(payload: Mapping[str, Any], store: AdapterStore) -> list[CompressorItem]:
    """Items from the payload's `items` list or its `items_uri` JSONL blob."""
    records: Any = payload.get("items")
    try:
        if records is None and payload.get("items_uri"):
            text = store.get_blob(str(payload["items_uri"])).decode("utf-8")
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not isinstance(records, list) or not records:
            raise ValueError("none given")
        return [_item(record) for record in records]
    except ValueError as exc:
        raise PermanentJobError(MSG_ITEMS.format(detail=exc)) from exc


def with_passages(settings: Settings, tenant: str, items: Sequence[CompressorItem],
                  top_k: int) -> list[CompressorItem]:
    """Each item with its top_k retrieved passages of its document (best last); items without passages dropped."""
    from engines.embedder import shared_embedder
    from registry.vector_index import VectorIndex

    vectors = shared_embedder(settings).embed([item.question for item in items])
    out = []
    with VectorIndex.open(settings) as index:
        for item, vector in zip(items, vectors, strict=True):
            hits = index.search(tenant, [item.document_id], vector, top_k)
            if hits:
                out.append(CompressorItem(item.document_id, item.question, item.answer,
                                          tuple(h.text for h in reversed(hits))))
    if not out:
        raise PermanentJobError(MSG_NO_PASSAGES)
    return out


def answer_logprob(model: Any, tokenizer: Any, question: str, context: str | None, answer: str) -> float:
    """log p(answer | serving prompt with `context` as its passage) under the model, summed over answer tokens."""
    import torch

    prefix = chat_prefix(tokenizer, context_prompt(question, context))
    target = encode(tokenizer, answer)
    ids = torch.tensor([prefix + target], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prefix) - 1:-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, len(prefix):, None])
    return float(logps.sum())


@dataclass(frozen=True)
class ContrastiveExample:
    """A question, the sentence that helps the generator most, and the other sentences."""

    question: str
    positive: str
    negatives: tuple[str, ...]


def contrastive_example(model: Any, tokenizer: Any, item: CompressorItem) -> ContrastiveExample | None:
    """The item's sentences ranked by the answer log-likelihood they give; None with fewer than two sentences."""
    sentences = [text for _, _, text in candidate_sentences(item.passages)]
    if len(sentences) < 2:
        return None
    scores = [answer_logprob(model, tokenizer, item.question, s, item.answer) for s in sentences]
    best = max(range(len(sentences)), key=scores.__getitem__)
    return ContrastiveExample(item.question, sentences[best], tuple(s for i, s in enumerate(sentences) if i != best))


def selective_target(summary: str, with_summary: float, closed_book: float) -> str:
    """The summary when it makes the gold answer more likely than no passages at all, else "" (closed-book)."""
    return summary if summary and with_summary > closed_book else ""


def teacher_summary(model: Any, tokenizer: Any, item: CompressorItem, max_new_tokens: int) -> str:
    """The base generator's greedy query-focused summary of the item's passages."""
    import torch

    prefix = chat_prefix(tokenizer, abstractive_prompt(item.question, item.passages))
    ids = torch.tensor([prefix], device=next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    return str(tokenizer.decode(out[0, len(prefix):], skip_special_tokens=True)).strip()


def summary_target(model: Any, tokenizer: Any, item: CompressorItem, max_new_tokens: int) -> str:
    """The abstractive target of an item: the teacher's summary if it helps the answer, else ""."""
    summary = teacher_summary(model, tokenizer, item, max_new_tokens)
    with_summary = answer_logprob(model, tokenizer, item.question, summary, item.answer) if summary else 0.0
    closed_book = answer_logprob(model, tokenizer, item.question, None, item.answer)
    return selective_target(summary, with_summary, closed_book)
