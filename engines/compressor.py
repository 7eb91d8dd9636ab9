"""RECOMP compressors shared by the server and the worker: sentence splitting, the extractive dual encoder, prompts.

Extractive: every sentence of the retrieved passages is scored by cosine(question, sentence) under the MiniLM dual
encoder (optionally with a trained LoRA merged in) and the top k are kept in their original order. Abstractive: a LoRA
on the generator writes a query-focused summary from `abstractive_prompt`; an empty summary means "no passages".
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engines.embedder import Embedder, load_sentence_transformer, resolve_device
from engines.prompts import reader_prompt, with_passages

if TYPE_CHECKING:
    from registry.config import Settings

EXTRACTIVE_LINEAGE = "compressor:extractive"
ABSTRACTIVE_LINEAGE = "compressor:abstractive"
DEFAULT_K = 3
# RECOMP's teacher instruction; also the abstractive compressor's input at training and at query time.
SUMMARY_INSTRUCTION = (
    "Compress the information in the retrieved documents into a 2-sentence summary that could be used to answer "
    "the question.\nQuestion: {question}"
)
BERT_LORA_TARGETS = ("query", "value")

ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "al", "no", "fig",
    "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov",
    "dec", "gen", "col", "capt", "lt", "sgt", "gov", "rev", "u.s", "u.k", "approx", "dept", "est", "vol",
})
_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")
_OPENERS = re.compile(r"[A-Z0-9\"'\u201c\u2018(\[]")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")


class Encoder(Protocol):
    """Texts -> L2-normalized vectors."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def _hard_lines(paragraph: str) -> list[str]:
    # A newline ends a sentence after terminal punctuation or before a list item; otherwise it is wrapped text.
    blocks: list[str] = []
    for line in (part.strip() for part in paragraph.split("\n")):
        if not line:
            continue
        if blocks and not _BULLET.match(line) and not re.search(r"[.!?:;\"'\u201d)]$", blocks[-1]):
            blocks[-1] = f"{blocks[-1]} {line}"
        else:
            blocks.append(line)
    return blocks


def _is_abbreviation(text: str, end: int) -> bool:
    word = text[:end].rsplit(None, 1)[-1].lstrip("(\"'").lower() if text[:end].strip() else ""
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _split_block(block: str) -> list[str]:
    sentences, start = [], 0
    for match in _END.finditer(block):
        rest = block[match.end():]
        dot = match.start()
        if not rest or not _OPENERS.match(rest):
            continue
        if block[match.start()] == "." and _is_abbreviation(block, dot):
            continue
        sentences.append(block[start:match.end()].strip())
        start = match.end()
    sentences.append(block[start:].strip())
    return [s for s in sentences if s]


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: paragraph breaks and line-ended sentences split, abbreviations and initials do not."""
    return [s for paragraph in _PARAGRAPH.split(text) for block in _hard_lines(paragraph) for s in _split_block(block)]


@dataclass(frozen=True)
class ScoredSentence:
    """A sentence, where it came from (passage, position) and its similarity to the question."""

    passage: int
    position: int
    text: str
    score: float


@dataclass(frozen=True)
class Extract:
    """What the extractive compressor kept, in prompt order, and the text that replaces the passages."""

    sentences: list[ScoredSentence]

    @property
    def text(self) -> str:
        """The kept sentences joined with spaces."""
        return " ".join(s.text for s in self.sentences)


def candidate_sentences(passages: Sequence[str]) -> list[tuple[int, int, str]]:
    """(passage, position, sentence) of every distinct sentence of the passages, in order."""
    seen: set[str] = set()
    out = []
    for p, passage in enumerate(passages):
        for i, sentence in enumerate(split_sentences(passage)):
            if sentence not in seen:  # overlapping chunks repeat sentences
                seen.add(sentence)
                out.append((p, i, sentence))
    return out


def score_sentences(encoder: Encoder, question: str, passages: Sequence[str]) -> list[ScoredSentence]:
    """Every distinct sentence of the passages with its cosine similarity to the question, in passage order."""
    candidates = candidate_sentences(passages)
    if not candidates:
        return []
    question_vec, *vectors = encoder.embed([question, *(c[2] for c in candidates)])
    return [ScoredSentence(p, i, text, _dot(question_vec, v)) for (p, i, text), v in zip(candidates, vectors,
                                                                                           strict=True)]


def extract(encoder: Encoder, question: str, passages: Sequence[str], k: int = DEFAULT_K) -> Extract:
    """The k sentences most similar to the question, kept in their original (passage, position) order."""
    scored = score_sentences(encoder, question, passages)
    top = sorted(scored, key=lambda s: -s.score)[:k]
    return Extract(sorted(top, key=lambda s: (s.passage, s.position)))


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))


def abstractive_prompt(question: str, passages: Sequence[str]) -> str:
    """The abstractive compressor's input: the passages, then the query-focused summary instruction."""
    return with_passages(passages, SUMMARY_INSTRUCTION.format(question=question))


def context_prompt(question: str, context: str | None) -> str:
    """The serving prompt with `context` as its one passage, or the closed-book prompt when None or empty."""
    return reader_prompt(question, [context] if context else [])


class AdaptedEmbedder(Embedder):
    """The MiniLM dual encoder with a trained compressor LoRA merged into its BertModel."""

    def __init__(self, model: str | Path | None, adapter_dir: Path, *, device: str = "auto") -> None:
        super().__init__(model, device=device)
        self.adapter_dir = adapter_dir

    def _loaded(self) -> Any:
        if self._model is None:
            from peft import PeftModel

            model = load_sentence_transformer(self.model_path, resolve_device(self.device))
            bert = model[0].auto_model
            model[0].auto_model = PeftModel.from_pretrained(bert, str(self.adapter_dir)).merge_and_unload()
            model.eval()
            self._model = model
        return self._model


_adapted: dict[tuple[str, int], AdaptedEmbedder] = {}
_adapted_lock = threading.Lock()
MAX_ADAPTED = 4


def adapted_embedder(settings: Settings, adapter_id: int, adapter_dir: Path) -> AdaptedEmbedder:
    """The process's encoder for one trained extractive compressor version (a few kept, oldest dropped)."""
    key = (str(settings.embedding_model or ""), adapter_id)
    with _adapted_lock:
        if key not in _adapted:
            if len(_adapted) >= MAX_ADAPTED:
                _adapted.pop(next(iter(_adapted)))
            _adapted[key] = AdaptedEmbedder(settings.embedding_model, adapter_dir, device=settings.embedding_device)
        return _adapted[key]
