"""Training examples of a knowledge module: synthetic DCD pairs, document windows (DDCD and LM), dev split, sampling.

Every example holds token ids whose last `target_len` tokens are the target on both sides: the target is tokenized
once and appended to both the teacher's and the student's prefix, so both sides see exactly the same target tokens
(tokenizing the two full texts separately could merge tokens differently at the prefix/target boundary).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.prompts import CLOSED_BOOK_PROMPT

log = logging.getLogger(__name__)

SUMMARY_PROMPT = "Summarize the preceding passage."
QA_PROMPT = "Generate a question-answer pair given the preceding passage."
PROMPTS = {"summary": SUMMARY_PROMPT, "qa": QA_PROMPT, "answer": CLOSED_BOOK_PROMPT}
WINDOW_METHODS = ("ddcd", "lm")
MIN_DOCUMENT_TOKENS = 8

MSG_TARGET_LEN = "target_len must be in 1..{limit} (the shorter side's length), got {value}"
MSG_TARGET_MISMATCH = "the teacher's and the student's last target_len tokens must be the same target"
MSG_BAD_LINE = "synthetic data line {line}: {detail}"
MSG_NO_CHUNK = "synthetic data names chunk {index}, which is not among the document's training chunks"
MSG_TOO_FEW = "{what}: need at least {need}, got {got}"
MSG_METHOD = "method must be one of {choices}, got {value!r}"
MSG_CONTEXT_CUT = ("chunks %s are longer than max_context_tokens=%d: the teacher reads only their first %d tokens "
                   "(raise max_context_tokens or ingest smaller chunks)")


@dataclass(frozen=True)
class DcdExample:
    """Teacher ids (context + target) and student ids (target side), both ending with the same target tokens."""

    teacher_ids: tuple[int, ...]
    student_ids: tuple[int, ...]
    target_len: int

    def __post_init__(self) -> None:
        limit = min(len(self.teacher_ids), len(self.student_ids))
        if not 1 <= self.target_len <= limit:
            raise ValueError(MSG_TARGET_LEN.format(limit=limit, value=self.target_len))
        if self.teacher_ids[-self.target_len:] != self.student_ids[-self.target_len:]:
            raise ValueError(MSG_TARGET_MISMATCH)


@dataclass(frozen=True)
class SyntheticItem:
    """One generated target for a chunk: a summary, a QA pair already formatted as the trained target, or (kind
    `answer`) the answer alone to its question asked as the server asks it closed book. A QA pair given as question
    and answer keeps both, so that its answer target can be derived (`answer_items`)."""

    chunk_index: int
    kind: str
    target: str
    question: str = ""
    answer: str = ""

    @property
    def prompt(self) -> str:
        """The instruction the target answers."""
        return PROMPTS[self.kind].format(question=self.question) if self.kind == "answer" else PROMPTS[self.kind]


def answer_items(items: Sequence[SyntheticItem]) -> list[SyntheticItem]:
    """For every QA pair with its parts known, the answer target: the student reads the question in the serving
    closed-book prompt and the teacher reads it after the chunk, and the answer's tokens are distilled (the paper's
    code has this answer-only kind beside summaries and QA pairs). A QA pair's own target is mostly the question
    the student writes, its answer a few tokens at the end; here every distilled token is answer."""
    return [SyntheticItem(item.chunk_index, "answer", item.answer, item.question, item.answer)
            for item in items if item.kind == "qa" and item.question and item.answer.strip()]


def qa_target(question: str, answer: str) -> str:
    """The trained text of a QA pair."""
    return f"\nQuestion: {question}\nAnswer: {answer}"


def _synthetic_item(record: Any) -> SyntheticItem:
    if not isinstance(record, dict) or not isinstance(record.get("chunk_index"), int):
        raise ValueError("each line must be an object with an integer chunk_index")
    kind = record.get("type")
    if kind == "qa" and "question" in record:
        question, answer = str(record["question"]), str(record["answer"])
        return SyntheticItem(record["chunk_index"], "qa", qa_target(question, answer), question, answer)
    if kind in ("summary", "qa") and isinstance(record.get("text"), str):
        return SyntheticItem(record["chunk_index"], kind, record["text"])
    raise ValueError(f"type must be 'summary' (with text) or 'qa' (with text or question+answer), got {kind!r}")


def parse_synthetic(data: bytes | str) -> list[SyntheticItem]:
    """Targets from JSONL: {chunk_index, type: summary|qa, text} or {chunk_index, type: qa, question, answer}."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_synthetic_item(json.loads(line)))
        except (ValueError, KeyError) as exc:
            raise ValueError(MSG_BAD_LINE.format(line=number, detail=exc)) from exc
    return items


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text, without special tokens."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def chat_prefix(tokenizer: Any, content: str) -> list[int]:
    """Token ids of one user message in the chat template, ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        )
        return [int(i) for i in encoded["input_ids"]]
    # A base model without a chat template: the plain text after the tokenizer's own special tokens (BOS).
    return [int(i) for i in tokenizer(content + "\n", add_special_tokens=True)["input_ids"]]


def fit_context(tokenizer: Any, chunk: str, max_context_tokens: int) -> tuple[str, bool]:
    """The chunk as the teacher reads it (its first `max_context_tokens` tokens), and whether that cut it short."""
    context_ids = encode(tokenizer, chunk)
    if len(context_ids) > max_context_tokens:
        return tokenizer.decode(context_ids[:max_context_tokens]), True
    return chunk, False


def sdcd_example(tokenizer: Any, chunk: str, prompt: str, target: str, *, max_context_tokens: int,
                 max_target_tokens: int) -> DcdExample:
    """Teacher = chat(chunk + "\\n\\n" + prompt) + target, student = chat(prompt) + target."""
    return _sdcd_pair(tokenizer, fit_context(tokenizer, chunk, max_context_tokens)[0], prompt).example(
        tuple(encode(tokenizer, target)[:max_target_tokens]))


@dataclass(frozen=True)
class _SdcdPrefixes:
    teacher: tuple[int, ...]
    student: tuple[int, ...]

    def example(self, target_ids: tuple[int, ...]) -> DcdExample:
        return DcdExample(self.teacher + target_ids, self.student + target_ids, len(target_ids))


def _sdcd_pair(tokenizer: Any, context: str, prompt: str) -> _SdcdPrefixes:
    teacher = chat_prefix(tokenizer, context + "\n\n" + prompt)
    return _SdcdPrefixes(tuple(teacher), tuple(chat_prefix(tokenizer, prompt)))


def sdcd_examples(tokenizer: Any, chunks: Mapping[int, str], items: Sequence[SyntheticItem], *,
                  max_context_tokens: int, max_target_tokens: int) -> list[DcdExample]:
    """One example per synthetic item whose target is not empty (each chunk and prompt encoded once)."""
    return _sdcd_data(tokenizer, chunks, items, max_context_tokens, max_target_tokens)[0]


def _sdcd_data(tokenizer: Any, chunks: Mapping[int, str], items: Sequence[SyntheticItem], max_context_tokens: int,
               max_target_tokens: int) -> tuple[list[DcdExample], list[int]]:
    """The examples, and the chunks (of those the items use) that the teacher's context cuts short."""
    used = {item.chunk_index for item in items}
    missing = sorted(used - set(chunks))
    if missing:
        raise ValueError(MSG_NO_CHUNK.format(index=missing[0]))
    contexts = {index: fit_context(tokenizer, chunks[index], max_context_tokens) for index in sorted(used)}
    prefixes: dict[tuple[int, str], _SdcdPrefixes] = {}
    examples = []
    for item in items:
        target_ids = tuple(encode(tokenizer, item.target)[:max_target_tokens])
        if not target_ids:
            continue
        key = (item.chunk_index, item.prompt)
        if key not in prefixes:
            prefixes[key] = _sdcd_pair(tokenizer, contexts[item.chunk_index][0], item.prompt)
        examples.append(prefixes[key].example(target_ids))
    return examples, [index for index, (_, cut) in contexts.items() if cut]


def context_cut_note(cut: Sequence[int], max_context_tokens: int) -> str | None:
    """A note naming the chunks longer than the teacher's context, which reads only their first
    `max_context_tokens` tokens; None when every chunk fits."""
    return MSG_CONTEXT_CUT % (list(cut), max_context_tokens, max_context_tokens) if cut else None


def _bos(tokenizer: Any) -> tuple[int, ...]:
    # Models are trained with BOS at position 0; without it the first positions are off-distribution.
    bos = getattr(tokenizer, "bos_token_id", None)
    return (int(bos),) if bos is not None else ()


def window_example(method: str, window: Sequence[int], bos: tuple[int, ...], target_fraction: float) -> DcdExample:
    """DDCD: teacher = the window, student = its last part; LM: the whole window is the target."""
    tokens = tuple(window)
    if method == "lm":
        # Without BOS the first token has nothing to be predicted from, so it is not a target.
        return DcdExample(bos + tokens, bos + tokens, len(tokens) - (0 if bos else 1))
    target_len = max(1, min(len(tokens) - 1, round(len(tokens) * target_fraction)))
    return DcdExample(bos + tokens, bos + tokens[-target_len:], target_len)


class ExampleDeck:
    """A fixed list of examples drawn in shuffled epochs."""

    def __init__(self, examples: Sequence[DcdExample]) -> None:
        self.examples = list(examples)
        self._order: list[int] = []
        self._cursor = 0

    def draw(self, rng: random.Random, count: int) -> list[DcdExample]:
        """The next `count` examples, reshuffling at the end of every epoch."""
        batch = []
        for _ in range(count):
            if self._cursor >= len(self._order):
                self._order = list(range(len(self.examples)))
                rng.shuffle(self._order)
                self._cursor = 0
            batch.append(self.examples[self._order[self._cursor]])
            self._cursor += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch stands (JSON-safe)."""
        return {"order": list(self._order), "cursor": self._cursor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue an epoch saved by `state_dict`."""
        self._order, self._cursor = [int(i) for i in state["order"]], int(state["cursor"])


@dataclass
class WindowSource:
    """Random windows of a document's tokens, made into DDCD or LM examples."""

    tokens: list[int]
    window: int
    method: str
    bos: tuple[int, ...] = ()
    target_fraction: float = 0.23

    def draw(self, rng: random.Random, count: int) -> list[DcdExample]:
        """`count` windows at random places.

        LM: windows of `window` tokens (the whole document when shorter) at random offsets. DDCD: a window ends at a
        random token and reaches back at most `window` tokens; its last part is the target, so targets fall
        anywhere in the document, its opening included, each with the context before it. A fixed width would give a
        document shorter than the window the same example every time, the same last quarter as its only target.
        """
        if self.method == "ddcd":
            first = min(len(self.tokens), MIN_DOCUMENT_TOKENS)
            ends = [rng.randint(first, len(self.tokens)) for _ in range(count)]
            return [window_example(self.method, self.tokens[max(0, e - self.window):e], self.bos,
                                   self.target_fraction) for e in ends]
        width = min(self.window, len(self.tokens))
        starts = [rng.randrange(len(self.tokens) - width + 1) for _ in range(count)]
        return [window_example(self.method, self.tokens[s:s + width], self.bos, self.target_fraction) for s in starts]

    def state_dict(self) -> dict[str, Any]:
        """No state beyond the sampler's random generator."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


Source = ExampleDeck | WindowSource


class TrainSampler:
    """Draws training batches from a source with its own seeded generator, so a resumed run draws the same ones."""

    def __init__(self, source: Source, seed: int) -> None:
        self.source = source
        self.rng = random.Random(seed)

    def next_batch(self, count: int) -> list[DcdExample]:
        """The next `count` examples."""
        return self.source.draw(self.rng, count)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state and the source's (JSON-safe)."""
        version, internal, gauss = self.rng.getstate()
        return {"random": [version, list(internal), gauss], "source": self.source.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken."""
        version, internal, gauss = state["random"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.source.load_state_dict(state["source"])


@dataclass
class KmData:
    """What a knowledge module trains on: a source of training examples and a fixed dev set."""

    source: Source
    dev: list[DcdExample] = field(default_factory=list)
    notes: tuple[str, ...] = ()  # what the job should tell its user about the data (a context cut short)

    def sampler(self, seed: int) -> TrainSampler:
        """A sampler over the training source."""
        return TrainSampler(self.source, seed)


def _dev_count(total: int, fraction: float, max_dev: int) -> int:
    return max(1, min(max_dev, math.ceil(total * fraction)))


def synthetic_data(tokenizer: Any, chunks: Mapping[int, str], items: Sequence[SyntheticItem], *,
                   dev_fraction: float, max_dev: int, seed: int, max_context_tokens: int,
                   max_target_tokens: int, answer_targets: bool = False) -> KmData:
    """SDCD data: examples from synthetic items (and, with `answer_targets`, each QA pair's answer target), a seeded
    `dev_fraction` of them held out as the dev set."""
    if answer_targets:
        items = [*items, *answer_items(items)]
    examples, cut = _sdcd_data(tokenizer, chunks, items, max_context_tokens, max_target_tokens)
    if len(examples) < 2:
        raise ValueError(MSG_TOO_FEW.format(what="synthetic examples", need=2, got=len(examples)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_dev = min(_dev_count(len(examples), dev_fraction, max_dev), len(examples) - 1)
    dev = [examples[i] for i in sorted(order[:n_dev])]
    note = context_cut_note(cut, max_context_tokens)
    if note:
        log.warning(note)
    return KmData(ExampleDeck([examples[i] for i in sorted(order[n_dev:])]), dev, (note,) if note else ())


def document_data(tokenizer: Any, text: str, *, method: str, window: int, target_fraction: float,
                  dev_fraction: float, max_dev: int) -> KmData:
    """DDCD or LM data: random windows of the document's head; consecutive windows of its tail are the dev set."""
    if method not in WINDOW_METHODS:
        raise ValueError(MSG_METHOD.format(choices=", ".join(WINDOW_METHODS), value=method))
    tokens = encode(tokenizer, text)
    if len(tokens) < MIN_DOCUMENT_TOKENS:
        raise ValueError(MSG_TOO_FEW.format(what="document tokens", need=MIN_DOCUMENT_TOKENS, got=len(tokens)))
    n_dev = max(MIN_DOCUMENT_TOKENS // 2, math.ceil(len(tokens) * dev_fraction))
    head, tail = tokens[:-n_dev], tokens[-n_dev:]
    width, bos = min(window, len(tail)), _bos(tokenizer)
    starts = range(0, len(tail) - width + 1, width)
    dev = [window_example(method, tail[s:s + width], bos, target_fraction) for s in starts][:max_dev]
    return KmData(WindowSource(head, window, method, bos, target_fraction), dev)
