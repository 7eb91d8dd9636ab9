"""Training data of the RECOMP compressors: items, their retrieved passages, and labels from the generator.

Labels come from the base generator's log-likelihood of the gold answer under the serving prompt: the extractive
positive is the sentence that raises it most, its negatives up to 5 sentences scoring more than epsilon below it,
most similar to the question first; the abstractive target is the best of n teacher summaries, kept only when it
raises the likelihood above the closed-book prompt, else "" (selective augmentation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.compressor import Encoder, abstractive_prompt, context_prompt, score_sentences
from trainer_worker.context import PermanentJobError
from trainer_worker.km_data import chat_prefix, encode

if TYPE_CHECKING:
    from registry.config import Settings
    from registry.store import AdapterStore

MSG_ITEMS = "train_compressor needs items: a list of {document_id, question, answer} or items_uri (JSONL); {detail}"
MAX_NEGATIVES = 5
SAMPLE_TEMPERATURE = 0.8
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
    """A question, the sentence that helps the generator most, and hard negatives (most similar first)."""

    question: str
    positive: str
    negatives: tuple[str, ...]


def select_pairs(scores: Sequence[float], similarities: Sequence[float], epsilon: float,
                 max_negatives: int = MAX_NEGATIVES) -> tuple[int, list[int]]:
    """The positive (best score) and the negatives: sentences scoring below the best by more than epsilon
    (a gap of exactly epsilon is not enough), most similar to the question first, at most `max_negatives`."""
    if not scores or len(scores) != len(similarities):
        raise ValueError("scores and similarities must be non-empty and of the same length")
    best = max(range(len(scores)), key=scores.__getitem__)
    below = [i for i, score in enumerate(scores) if scores[best] - score > epsilon]
    below.sort(key=lambda i: (-similarities[i], i))
    return best, below[:max_negatives]


def contrastive_example(model: Any, tokenizer: Any, encoder: Encoder, item: CompressorItem,
                        epsilon: float) -> ContrastiveExample | None:
    """The item's positive and hard negatives by `select_pairs`; None when it has no valid negative."""
    scored = score_sentences(encoder, item.question, item.passages)
    if len(scored) < 2:
        return None
    scores = [answer_logprob(model, tokenizer, item.question, s.text, item.answer) for s in scored]
    best, negatives = select_pairs(scores, [s.score for s in scored], epsilon)
    if not negatives:
        return None
    return ContrastiveExample(item.question, scored[best].text, tuple(scored[i].text for i in negatives))


def selective_target(summary: str, with_summary: float, closed_book: float) -> str:
    """The summary when it makes the gold answer more likely than no passages at all, else "" (closed-book)."""
    return summary if summary and with_summary > closed_book else ""


def choose_summary(candidates: Sequence[tuple[str, float]], closed_book: float) -> str:
    """The candidate (summary, gold-answer log-likelihood) scoring best, if it beats closed-book; else ""."""
    scored = [(text, logprob) for text, logprob in candidates if text]
    if not scored:
        return ""
    text, logprob = max(scored, key=lambda candidate: candidate[1])
    return selective_target(text, logprob, closed_book)


def teacher_summaries(model: Any, tokenizer: Any, item: CompressorItem, max_new_tokens: int, n: int) -> list[str]:
    """n distinct candidate summaries by the base generator: the greedy one, then sampled ones."""
    import torch

    prefix = chat_prefix(tokenizer, abstractive_prompt(item.question, item.passages))
    ids = torch.tensor([prefix], device=next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens,
              "pad_token_id": pad}
    with torch.no_grad():
        outputs = [*model.generate(**common, do_sample=False)]
        if n > 1:
            outputs += [*model.generate(**common, do_sample=True, temperature=SAMPLE_TEMPERATURE, top_p=0.95,
                                        num_return_sequences=n - 1)]
    texts = [str(tokenizer.decode(out[len(prefix):], skip_special_tokens=True)).strip() for out in outputs]
    return list(dict.fromkeys(texts))


def summary_target(model: Any, tokenizer: Any, item: CompressorItem, max_new_tokens: int, n: int = 1) -> str:
    """The abstractive target of an item: the teacher's best of n summaries if it helps the answer, else ""."""
    candidates = [(text, answer_logprob(model, tokenizer, item.question, text, item.answer) if text else 0.0)
                  for text in teacher_summaries(model, tokenizer, item, max_new_tokens, n)]
    closed_book = answer_logprob(model, tokenizer, item.question, None, item.answer)
    return choose_summary(candidates, closed_book)
