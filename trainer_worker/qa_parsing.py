"""Question/answer pairs out of generated text, tolerant of what models actually write.

The prompt asks for `<question id='1'>...</question>` / `<answer id='1'>...</answer>` pairs. Accepted as well:
tags in any case, with or without ids or closing tags (a generation cut off by max_tokens usually lacks the last
one), numbering and "Question:"/"Answer:" labels inside tags, text around the tags, and, when there are no tags at
all, plain "Question: ... Answer: ..." lines. A question is paired with the answer carrying its id, else with the
next answer. Everything that does not make a pair (a question left unanswered, an answer without a question, an
empty side) is dropped and counted, so the caller can report how much of the generation was malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# An opening or closing tag; attributes such as id='1' are allowed in the opening one.
_TAG = re.compile(r"<\s*(?P<close>/)?\s*(?P<kind>question|answer)\b(?P<attrs>[^<>]*)>", re.IGNORECASE)
_TAG_ID = re.compile(r"""\bid\s*=\s*["']?\s*(?P<id>[\w-]+)""", re.IGNORECASE)
# "Question 2:" / "Answer:" at the start of a line or after whitespace, for untagged text.
_LABEL = re.compile(r"(?:^|(?<=\s))(?P<kind>question|answer)\s*(?P<id>\d*)\s*:", re.IGNORECASE)
_LEADING_NOISE = re.compile(
    r"^(?:\d{1,2}[.)]\s+|(?:question|answer)\s*\d*\s*[:.)]\s*|[qa]\s*\d*\s*:\s*)+", re.IGNORECASE
)
_PARTIAL_TAG = re.compile(r"<[^<>]*$")  # a tag cut off by the token limit


@dataclass(frozen=True)
class QAPair:
    """One question and its answer, whitespace-normalized."""

    question: str
    answer: str


@dataclass(frozen=True)
class QAParse:
    """The pairs found in one generation and how many malformed ones were dropped."""

    pairs: list[QAPair] = field(default_factory=list)
    dropped: int = 0


@dataclass(frozen=True)
class _Segment:
    kind: str  # "question" or "answer"
    id: str | None
    text: str


def parse_qa(text: str) -> QAParse:
    """The question/answer pairs in a generation; malformed ones are dropped and counted."""
    segments = _tagged_segments(text) or _labelled_segments(text)
    return _pair(segments)


def clean_field(text: str) -> str:
    """A question or answer without numbering, labels, a cut-off tag or extra whitespace."""
    text = _PARTIAL_TAG.sub("", text)
    text = " ".join(text.split())
    return _LEADING_NOISE.sub("", text).strip()


def _tagged_segments(text: str) -> list[_Segment]:
    # Each opening tag's content runs to the next tag of any kind (its closing tag, normally) or to the end.
    tags = list(_TAG.finditer(text))
    segments = []
    for n, tag in enumerate(tags):
        if tag["close"]:
            continue
        end = tags[n + 1].start() if n + 1 < len(tags) else len(text)
        tag_id = _TAG_ID.search(tag["attrs"])
        segments.append(_Segment(tag["kind"].lower(), tag_id["id"] if tag_id else None, text[tag.end():end]))
    return segments


def _labelled_segments(text: str) -> list[_Segment]:
    labels = list(_LABEL.finditer(text))
    segments = []
    for n, label in enumerate(labels):
        end = labels[n + 1].start() if n + 1 < len(labels) else len(text)
        segments.append(_Segment(label["kind"].lower(), label["id"] or None, text[label.end():end]))
    return segments


def _pair(segments: list[_Segment]) -> QAParse:
    pairs: list[QAPair] = []
    pending: list[_Segment] = []  # questions waiting for their answer, oldest first
    dropped = 0
    for segment in segments:
        if segment.kind == "question":
            pending.append(segment)
            continue
        question = _match(pending, segment.id)
        if question is None:
            dropped += 1  # an answer to no question
            continue
        pending.remove(question)
        pair = QAPair(clean_field(question.text), clean_field(segment.text))
        if pair.question and pair.answer:
            pairs.append(pair)
        else:
            dropped += 1
    return QAParse(pairs, dropped + len(pending))


def _match(pending: list[_Segment], answer_id: str | None) -> _Segment | None:
    """The waiting question with the answer's id, else the most recent one (the question just before)."""
    if answer_id is not None:
        for question in pending:
            if question.id == answer_id:
                return question
    return pending[-1] if pending else None
