"""Training items and teacher rationales for the KARD jobs (`train_reranker`, `train_reasoner`).

Items are `{"document_id", "question", "answer"}`, inline (`items`) or as a JSONL blob (`items_uri`). The teacher is
the base generator, told the gold answer and asked to explain it step by step; `rationales` in the payload (one
string or list of strings per item, aligned with the items) replace what the teacher would write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engines.base import ChatMessage, GenerationRequest, SamplingParams
from engines.reasoning import leads_to
from trainer_worker.context import JobContext, PermanentJobError

TEACHER_PROMPT = "Question: {question}\nThe answer is {answer}. Explain step by step why, citing facts, and end " \
                 "with 'The answer is {answer}.'"
MSG_NO_ITEMS = "the job needs training items: give 'items' (a list) or 'items_uri' (a JSONL blob)"
MSG_BAD_ITEM = "training item {index} must be an object with document_id (int), question and answer (strings)"
MSG_BAD_RATIONALES = "'rationales' must be a list with one string or list of strings per item ({count} items)"


@dataclass(frozen=True)
class TrainItem:
    """A training question about a document, with its gold answer."""

    document_id: int
    question: str
    answer: str


@dataclass(frozen=True)
class Rationale:
    """A rationale written for an item."""

    item: TrainItem
    text: str


def _item(index: int, raw: object) -> TrainItem:
    ok = isinstance(raw, Mapping) and isinstance(raw.get("document_id"), int) \
        and isinstance(raw.get("question"), str) and isinstance(raw.get("answer"), str)
    if not ok or not raw["question"].strip() or not raw["answer"].strip():  # type: ignore[index]
        raise PermanentJobError(MSG_BAD_ITEM.format(index=index))
    assert isinstance(raw, Mapping)
    return TrainItem(raw["document_id"], raw["question"].strip(), raw["answer"].strip())


def load_items(ctx: JobContext) -> list[TrainItem]:
    """The job's training items, inline or read from the store; PermanentJobError when missing or malformed."""
    raw: Any = ctx.payload.get("items")
    if raw is None and ctx.payload.get("items_uri"):
        text = ctx.store.get_blob(str(ctx.payload["items_uri"])).decode("utf-8")
        try:
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise PermanentJobError(f"{MSG_NO_ITEMS} ({exc})") from exc
    if not isinstance(raw, list) or not raw:
        raise PermanentJobError(MSG_NO_ITEMS)
    return [_item(i, entry) for i, entry in enumerate(raw)]


def inline_rationales(payload: Mapping[str, Any], items: Sequence[TrainItem]) -> list[Rationale] | None:
    """The payload's `rationales`, one entry per item (a string or a list of strings); None when absent."""
    raw = payload.get("rationales")
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != len(items):
        raise PermanentJobError(MSG_BAD_RATIONALES.format(count=len(items)))
    out: list[Rationale] = []
    for item, entry in zip(items, raw, strict=True):
        texts = [entry] if isinstance(entry, str) else entry
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise PermanentJobError(MSG_BAD_RATIONALES.format(count=len(items)))
        out.extend(Rationale(item, t) for t in texts)
    return out


def teacher_requests(items: Sequence[TrainItem], n: int, max_tokens: int, seed: int) -> list[GenerationRequest]:
    """`n` sampled chain-of-thought requests per item (greedy when n is 1), the gold answer in the prompt."""
    requests = []
    for item in items:
        content = TEACHER_PROMPT.format(question=item.question, answer=item.answer)
        for k in range(n):
            sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0 if n == 1 else 0.7, top_p=0.95,
                                      seed=seed + k)
            requests.append(GenerationRequest(messages=(ChatMessage("user", content),), sampling=sampling))
    return requests


def teacher_rationales(ctx: JobContext, items: Sequence[TrainItem], n: int, max_tokens: int) -> list[Rationale]:
    """Rationales written by the base generator, `n` per item."""
    requests = teacher_requests(items, n, max_tokens, int(ctx.payload.get("seed", 0)))
    results = ctx.run_async(ctx.engine().generate(requests))
    owners = [item for item in items for _ in range(n)]
    return [Rationale(item, result.text.strip()) for item, result in zip(owners, results, strict=True)]


def job_rationales(ctx: JobContext, items: Sequence[TrainItem], n: int, max_tokens: int) -> list[Rationale]:
    """The payload's rationales when given, else the teacher's."""
    given = inline_rationales(ctx.payload, items)
    return given if given is not None else teacher_rationales(ctx, items, n, max_tokens)


def keep_correct(rationales: Sequence[Rationale]) -> list[Rationale]:
    """Only the rationales whose final answer contains the gold answer (normalised), as KARD filters them."""
    return [r for r in rationales if r.text.strip() and leads_to(r.text, r.item.answer)]
