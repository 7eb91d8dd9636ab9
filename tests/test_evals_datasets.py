"""Dataset loaders on small files written in the releases' own formats (QuALITY JSON lines, NarrativeQA CSVs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from evals.datasets import (
    DatasetFormatError,
    load_narrativeqa,
    load_quality,
    quality_path,
)

OPTIONS = ["In 1847", "In 1902", "In 1750", "Never"]


def quality_question(qid: str, gold: int | None, difficult: int = 0) -> dict[str, Any]:
    question: dict[str, Any] = {"question": f"When was it founded ({qid})?", "options": OPTIONS,
                                "difficult": difficult, "question_unique_id": qid}
    if gold is not None:
        question["gold_label"] = gold
        question["writer_label"] = gold
        question["validation"] = [{"untimed_annotator_id": "0", "untimed_answer": gold,
                                   "untimed_eval1_answerability": 1, "untimed_eval2_context": 1,
                                   "untimed_best_distractor": 1}]
    return question


def quality_line(article_id: str, set_id: str, questions: list[dict[str, Any]], title: str = "Harbor") -> str:
    record = {"article_id": article_id, "set_unique_id": set_id, "batch_num": "22", "writer_id": "1001",
              "source": "Gutenberg", "title": title, "year": 1950, "author": "A. Writer", "topic": "",
              "article": f"The story of {title}.\n\nIt was founded in 1847.", "questions": questions,
              "url": "http://example.invalid", "license": "Public Domain"}
    return json.dumps(record)


def write_quality(root: Path, split: str, lines: list[str]) -> Path:
    path = quality_path(root, split)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_quality_groups_question_sets_by_article(tmp_path: Path) -> None:
    path = write_quality(tmp_path, "dev", [
        quality_line("20001", "20001_A", [quality_question("20001_A_1", 1), quality_question("20001_A_2", 2, 1)]),
        quality_line("30002", "30002_A", [quality_question("30002_A_1", 4)], title="Other"),
        quality_line("20001", "20001_B", [quality_question("20001_B_1", 3)]),
    ])
    assert path.name == "QuALITY.v1.0.1.htmlstripped.dev"
    docs = load_quality(path)
    assert [d.document_id for d in docs] == ["20001", "30002"]
    harbor = docs[0]
    assert harbor.split == "dev" and harbor.title == "Harbor" and "founded in 1847" in harbor.text
    assert [q.question_id for q in harbor.questions] == ["20001_A_1", "20001_A_2", "20001_B_1"]
    assert [q.gold_index for q in harbor.questions] == [0, 1, 2]  # gold_label is 1-based
    assert harbor.questions[1].answers == ("In 1902",) and harbor.questions[1].options == tuple(OPTIONS)
    assert [q.metadata["difficult"] for q in harbor.questions] == [False, True, False]
    assert harbor.metadata["set_unique_ids"] == ["20001_A", "20001_B"]
    assert docs[1].questions[0].answers == ("Never",) and all(q.labelled for q in harbor.questions)


def test_quality_test_split_has_no_labels(tmp_path: Path) -> None:
    path = write_quality(tmp_path, "test", [quality_line("40004", "40004_A", [quality_question("40004_A_1", None)])])
    [doc] = load_quality(path)
    [question] = doc.questions
    assert doc.split == "test"
    assert question.gold_index is None and question.answers == () and not question.labelled
    assert question.options == tuple(OPTIONS)


def test_quality_reports_bad_lines_with_their_number(tmp_path: Path) -> None:
    good = quality_line("1", "1_A", [quality_question("1_A_1", 1)])
    path = write_quality(tmp_path, "train", [good, quality_line("2", "2_A", [quality_question("2_A_1", 5)])])
    with pytest.raises(DatasetFormatError, match=r"htmlstripped\.train:2: gold_label 5 is not in 1\.\.4"):
        load_quality(path)
    write_quality(tmp_path, "train", [good, "{not json"])
    with pytest.raises(DatasetFormatError, match=r"train:2: "):
        load_quality(path)
    write_quality(tmp_path, "train", [json.dumps({"article_id": "3", "questions": []})])
    with pytest.raises(DatasetFormatError, match="no 'article' field"):
        load_quality(path)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        quality_path(tmp_path, "validation")


# -- NarrativeQA -----------------------------------------------------------------------------------------------

DOC_COLUMNS = ["document_id", "set", "kind", "story_url", "story_file_size", "wiki_url", "wiki_title",
               "story_word_count", "story_start", "story_end"]
SUMMARY_COLUMNS = ["document_id", "set", "summary", "summary_tokenized"]
QAPS_COLUMNS = ["document_id", "set", "question", "answer1", "answer2", "question_tokenized", "answer1_tokenized",
                "answer2_tokenized"]
DOCS = [
    ("0a1b", "test", "gutenberg", "Harbor Point", "CHAPTER I", "THE END"),
    ("0c2d", "test", "movie", "Night Train", "FADE IN", "FADE OUT"),
    ("0e3f", "train", "gutenberg", "The Valley", "Once", "ever after."),
]
STORY = "Produced by volunteers.\n\nCHAPTER I\nThe town, founded in 1847, sat by the river.\nTHE END\n\nLicense text."


def write_csv(path: Path, columns: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


@pytest.fixture
def narrativeqa(tmp_path: Path) -> Path:
    write_csv(tmp_path / "documents.csv", DOC_COLUMNS, [
        [d, s, kind, f"http://example.invalid/{d}", "1234", f"http://wiki.invalid/{d}", title, "400", start, end]
        for d, s, kind, title, start, end in DOCS])
    write_csv(tmp_path / "third_party" / "wikipedia" / "summaries.csv", SUMMARY_COLUMNS, [
        [d, s, f"Summary of {title}, with a comma.", f"summary of {title.lower()} , with a comma ."]
        for d, s, _, title, _, _ in DOCS])
    write_csv(tmp_path / "qaps.csv", QAPS_COLUMNS, [
        ["0a1b", "test", "When was the town founded?", "In 1847", "1847", "when was the town founded ?", "in 1847",
         "1847"],
        ["0c2d", "test", "Who drives the train?", "The driver", "A tired driver", "who drives the train ?",
         "the driver", "a tired driver"],
        ["0e3f", "train", "Where is the valley?", "North", "In the north", "where is the valley ?", "north",
         "in the north"],
        ["0a1b", "test", "Where does the town sit?", "By the river", "Near the river", "where does the town sit ?",
         "by the river", "near the river"],
    ])
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "0a1b.content").write_text(STORY, encoding="utf-8")  # 0c2d's story was never downloaded
    return tmp_path


def test_narrativeqa_test_split_uses_stories_and_falls_back_to_summaries(narrativeqa: Path) -> None:
    docs = load_narrativeqa(narrativeqa, "test")
    assert [d.document_id for d in docs] == ["0a1b", "0c2d"]
    story, summary = docs
    assert story.text == "CHAPTER I\nThe town, founded in 1847, sat by the river.\nTHE END"  # cut to the markers
    assert story.metadata["source"] == "story" and story.title == "Harbor Point" and story.split == "test"
    assert [q.question for q in story.questions] == ["When was the town founded?", "Where does the town sit?"]
    assert story.questions[0].answers == ("In 1847", "1847") and story.questions[0].options is None
    assert summary.text == "Summary of Night Train, with a comma." and summary.metadata["source"] == "summary"
    assert summary.questions[0].answers == ("The driver", "A tired driver")
    assert summary.metadata["kind"] == "movie"


def test_narrativeqa_sources_and_splits(narrativeqa: Path) -> None:
    assert [d.metadata["source"] for d in load_narrativeqa(narrativeqa, "test", source="summary")] == \
        ["summary", "summary"]
    with pytest.raises(FileNotFoundError, match=r"0c2d\.content"):
        load_narrativeqa(narrativeqa, "test", source="story")
    everything = load_narrativeqa(narrativeqa, None)
    assert [(d.document_id, d.split, len(d.questions)) for d in everything] == \
        [("0a1b", "test", 2), ("0c2d", "test", 1), ("0e3f", "train", 1)]
    assert load_narrativeqa(narrativeqa, "valid") == []
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_narrativeqa(narrativeqa, "dev")


def test_narrativeqa_whole_story_when_markers_are_absent_and_missing_files(narrativeqa: Path) -> None:
    (narrativeqa / "tmp" / "0a1b.content").write_text("No markers here.", encoding="utf-8")
    assert load_narrativeqa(narrativeqa, "test")[0].text == "No markers here."
    (narrativeqa / "qaps.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"qaps\.csv is missing"):
        load_narrativeqa(narrativeqa, "test")
