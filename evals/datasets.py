"""Evaluation datasets as one typed record: a document, its text, and its questions (free-text or multiple choice).

Loaders read the public releases as they are distributed:
- QuALITY v1.0.1 (github.com/nyu-mll/quality): JSON lines, one article per line *per question set* (the same
  article appears on several lines with different `set_unique_id`s), each with four-option questions and a 1-based
  `gold_label`; the test split has no labels. Lines are grouped into one document per `article_id`.
- NarrativeQA (github.com/deepmind/narrativeqa): `documents.csv`, `third_party/wikipedia/summaries.csv`,
  `qaps.csv`, and the stories downloaded to `tmp/<document_id>.content`. The document text is the story when its
  file is there (cut to the `story_start`..`story_end` markers when both occur in it), else the Wikipedia summary
  (the dataset's "summaries" setting).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

QUALITY_FILE = "QuALITY.v1.0.1.htmlstripped.{split}"
QUALITY_SPLITS = ("train", "dev", "test")
NARRATIVEQA_SPLITS = ("train", "valid", "test")
NarrativeSource = Literal["auto", "story", "summary"]

MSG_BAD_LINE = "{path}:{line}: {detail}"
MSG_BAD_SPLIT = "unknown split {split!r}; expected one of {choices}"
MSG_MISSING_FILE = "{path} is missing; download the dataset release into {root}"
MSG_NO_TEXT = "NarrativeQA document {document_id} has no story file at {path} and no summary"
MSG_NO_STORY = "NarrativeQA document {document_id} has no story file at {path} (source='story')"


class DatasetFormatError(ValueError):
    """A dataset file does not have the layout its loader reads; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Question:
    """One question: free-text `answers`, and for multiple choice the `options` and the 0-based `gold_index`.

    Unlabelled splits (QuALITY test) have options but no gold: `gold_index` is None and `answers` is empty.
    """

    question_id: str
    question: str
    answers: tuple[str, ...] = ()
    options: tuple[str, ...] | None = None
    gold_index: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        """True when the question can be scored (it has a gold answer or a gold option)."""
        return bool(self.answers) or self.gold_index is not None


@dataclass(frozen=True, slots=True)
class EvalDocument:
    """A document to learn (or read) and the questions asked about it."""

    document_id: str
    title: str
    text: str
    questions: tuple[Question, ...]
    split: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_split(split: str | None, choices: Sequence[str]) -> None:
    if split is not None and split not in choices:
        raise ValueError(MSG_BAD_SPLIT.format(split=split, choices=", ".join(choices)))


def _require(path: Path, root: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(MSG_MISSING_FILE.format(path=path, root=root))
    return path


# -- QuALITY -------------------------------------------------------------------------------------------------------

def quality_path(root: Path | str, split: str) -> Path:
    """Where the release keeps a split: `<root>/QuALITY.v1.0.1.htmlstripped.<split>`."""
    _check_split(split, QUALITY_SPLITS)
    return Path(root) / QUALITY_FILE.format(split=split)


def load_quality(path: Path | str, split: str | None = None) -> list[EvalDocument]:
    """QuALITY articles from one JSON-lines file, one document per article_id (in first-seen order)."""
    path = Path(path)
    split = split or _quality_split_of(path)
    firsts: dict[str, dict[str, Any]] = {}
    questions: dict[str, list[Question]] = {}
    sets: dict[str, list[str]] = {}
    for number, record in _json_lines(path):
        where = (path, number)
        doc_id = str(_field(record, "article_id", where))
        firsts.setdefault(doc_id, record)
        _field(record, "article", where)
        questions.setdefault(doc_id, []).extend(_quality_question(q, where) for q in _field(record, "questions", where))
        sets.setdefault(doc_id, []).append(str(record.get("set_unique_id", "")))
    return [EvalDocument(document_id=doc_id, title=str(first.get("title", "")), text=str(first["article"]),
                         questions=tuple(questions[doc_id]), split=split, metadata={"set_unique_ids": sets[doc_id]})
            for doc_id, first in firsts.items()]


def _quality_split_of(path: Path) -> str:
    suffix = path.name.rsplit(".", 1)[-1]
    return suffix if suffix in QUALITY_SPLITS else "unknown"


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(MSG_BAD_LINE.format(path=path, line=number, detail=exc.msg)) from exc
            if not isinstance(record, dict):
                raise DatasetFormatError(MSG_BAD_LINE.format(path=path, line=number, detail="not a JSON object"))
            yield number, record


def _field(record: dict[str, Any], key: str, where: tuple[Path, int]) -> Any:
    if key not in record:
        raise DatasetFormatError(MSG_BAD_LINE.format(path=where[0], line=where[1], detail=f"no {key!r} field"))
    return record[key]


def _quality_question(raw: dict[str, Any], where: tuple[Path, int]) -> Question:
    options = tuple(str(o) for o in _field(raw, "options", where))
    label = raw.get("gold_label")
    gold: int | None = None
    if label is not None:
        if not isinstance(label, int) or not 1 <= label <= len(options):
            detail = f"gold_label {label!r} is not in 1..{len(options)} (it is 1-based)"
            raise DatasetFormatError(MSG_BAD_LINE.format(path=where[0], line=where[1], detail=detail))
        gold = label - 1
    return Question(
        question_id=str(raw.get("question_unique_id", "")), question=str(_field(raw, "question", where)),
        answers=(options[gold],) if gold is not None else (), options=options, gold_index=gold,
        metadata={"difficult": bool(raw.get("difficult", 0))},
    )


# -- NarrativeQA ---------------------------------------------------------------------------------------------------

def load_narrativeqa(
    root: Path | str, split: str | None = "test", *, source: NarrativeSource = "auto"
) -> list[EvalDocument]:
    """NarrativeQA documents of a split (None: all) with their questions, from the repository layout at `root`.

    `source`: "auto" = the story when `tmp/<id>.content` exists, else the summary; "story" requires the story;
    "summary" always uses the summary.
    """
    root = Path(root)
    _check_split(split, NARRATIVEQA_SPLITS)
    rows = [r for r in _csv_rows(_require(root / "documents.csv", root)) if split is None or r["set"] == split]
    summaries = {r["document_id"]: r["summary"]
                 for r in _csv_rows(_require(root / "third_party" / "wikipedia" / "summaries.csv", root))}
    questions: dict[str, list[Question]] = {}
    for number, qa in enumerate(_csv_rows(_require(root / "qaps.csv", root))):
        if split is None or qa["set"] == split:
            questions.setdefault(qa["document_id"], []).append(_narrative_question(qa, number))
    return [_narrative_document(root, row, summaries, questions, source) for row in rows]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _narrative_question(qa: dict[str, str], number: int) -> Question:
    answers = tuple(a for a in (qa.get("answer1", ""), qa.get("answer2", "")) if a)
    return Question(question_id=f"{qa['document_id']}:{number}", question=qa["question"], answers=answers)


def _narrative_document(root: Path, row: dict[str, str], summaries: dict[str, str],
                        questions: dict[str, list[Question]], source: NarrativeSource) -> EvalDocument:
    doc_id = row["document_id"]
    story_path = root / "tmp" / f"{doc_id}.content"
    text, used = _narrative_text(row, story_path, summaries.get(doc_id, ""), source)
    metadata = {"kind": row.get("kind", ""), "source": used, "story_url": row.get("story_url", "")}
    return EvalDocument(document_id=doc_id, title=row.get("wiki_title", ""), text=text,
                        questions=tuple(questions.get(doc_id, ())), split=row["set"], metadata=metadata)


def _narrative_text(row: dict[str, str], story_path: Path, summary: str,
                    source: NarrativeSource) -> tuple[str, str]:
    if source != "summary" and story_path.is_file():
        story = story_path.read_text(encoding="utf-8", errors="replace")
        return _between_markers(story, row.get("story_start", ""), row.get("story_end", "")), "story"
    if source == "story":
        raise FileNotFoundError(MSG_NO_STORY.format(document_id=row["document_id"], path=story_path))
    if not summary:
        raise DatasetFormatError(MSG_NO_TEXT.format(document_id=row["document_id"], path=story_path))
    return summary, "summary"


def _between_markers(story: str, start: str, end: str) -> str:
    """The story from its start marker through its end marker, or all of it when either marker is not found."""
    begin = story.find(start) if start else -1
    finish = story.rfind(end) if end else -1
    if begin < 0 or finish < begin:
        return story
    return story[begin:finish + len(end)]
