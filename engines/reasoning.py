"""The reasoner's prompt and answer parsing (KARD), shared by the `train_reasoner` job and the query pipeline.

The reasoner sees retrieved passages and the question, writes a rationale, and ends with its answer; the same
prompt is used when it is trained and when it is served, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from engines.prompts import with_passages

REASONER_ALIAS = "reasoner:default"
REASONER_PROMPT = "Answer the following question. Think step by step, then end with 'Answer: <answer>'. " \
                  "Question: {question}"
ANSWER_SUFFIX = "\nAnswer: {answer}"
# Markers after which a rationale states its final answer; the last one in the text wins.
ANSWER_MARKER = re.compile(r"(?:answer\s*:|the answer is)", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def reasoner_prompt(question: str, passages: Sequence[str]) -> str:
    """The passages (in the order given, best last) numbered ahead of the reasoning instruction."""
    return with_passages(passages, REASONER_PROMPT.format(question=question))


def reasoner_target(rationale: str, answer: str) -> str:
    """What the reasoner learns to write: the rationale, then the gold answer on its own line."""
    return rationale.strip() + ANSWER_SUFFIX.format(answer=answer.strip())


def extract_answer(text: str) -> str:
    """The text after the last answer marker ('Answer:' / 'The answer is'), else the last non-empty line."""
    matches = list(ANSWER_MARKER.finditer(text))
    if matches:
        tail = text[matches[-1].end():].strip()
        return tail.splitlines()[0].strip().rstrip(".").strip() if tail else ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def leads_to(rationale: str, answer: str) -> bool:
    """True when the rationale's final answer contains the gold answer (both normalised)."""
    gold = normalize_answer(answer)
    return bool(gold) and gold in normalize_answer(extract_answer(rationale))
