"""The prompts a served question is asked with, shared by the server and the trainers that must match it.

The closed-book prompt is the knowledge-module paper's evaluation prompt; passages come ahead of it, numbered,
in the order given (the retrieval stage puts the best passage last). Trainers that learn on the serving prompt
(knowledge extractor, compressors, reasoner) import these, so training and serving can never drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

CLOSED_BOOK_PROMPT = (
    "Answer the following question. Give only the answer, and no extra commentary, formatting, or chattiness. "
    "Question: {question}"
)
PASSAGES_PREAMBLE = "Consider the following passages:\n"
PASSAGE_LINE = "Passage {number}: {text}\n"


def numbered_passages(texts: Sequence[str]) -> str:
    """`Passage 1: ...` lines, in the order given."""
    return "".join(PASSAGE_LINE.format(number=n, text=text) for n, text in enumerate(texts, start=1))


def with_passages(texts: Sequence[str], instruction: str) -> str:
    """The passages block (none when there are no passages) ahead of an instruction."""
    return (PASSAGES_PREAMBLE + numbered_passages(texts) if texts else "") + instruction


def reader_prompt(question: str, texts: Sequence[str] = ()) -> str:
    """The serving prompt: passages (if any) then the closed-book question."""
    return with_passages(texts, CLOSED_BOOK_PROMPT.format(question=question))
