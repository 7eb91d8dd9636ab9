"""The knowledge-injection benchmark end to end: `kmserve eval synthetic` on an embedded platform (tiny model)."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients.cli import app
from evals.harness import SETTING_NAMES, HarnessOptions, methods_for
from evals.report import GOALS, SettingScore, goals
from evals.run import SyntheticOptions, as_eval_document, synthetic_documents
from evals.synthetic_facts import generate_documents

SETTINGS = "base,KM-SDCD,KM-LM,KE,KM+KE,ICL,RAG,RAG+KM+KE"


def test_synthetic_documents_split_test_and_training_questions() -> None:
    test, train = synthetic_documents(SyntheticOptions(docs=3, train_docs=2, min_facts=20, max_facts=24,
                                                       questions_per_doc=5))
    assert [len(d.questions) for d in test] == [5, 5, 5]
    assert all(len(d.questions) >= 20 for d in train)  # every fact of a training document is asked
    assert {d.document_id for d in test}.isdisjoint(d.document_id for d in train)
    for doc in test:
        for question in doc.questions:
            assert question.answers[0] in doc.text


def test_paraphrase_family_and_subsampling_are_seeded() -> None:
    doc = generate_documents(1, 5, min_facts=20, max_facts=20)[0]
    first = as_eval_document(doc, "paraphrase", 4, random.Random(1))
    again = as_eval_document(doc, "paraphrase", 4, random.Random(1))
    assert first == again
    assert {q.metadata["family"] for q in first.questions} == {"paraphrase"}


def test_methods_follow_the_settings() -> None:
    chosen = HarnessOptions(settings=("KM-LM", "KE")).selected()
    assert methods_for(chosen) == ["sdcd", "lm"]  # the KE needs SDCD KMs of its training documents
    assert methods_for(HarnessOptions(settings=("base", "ICL", "RAG")).selected()) == []
    with pytest.raises(ValueError, match="unknown settings"):
        HarnessOptions(settings=("KM-XL",)).selected()


def test_goals_only_report_settings_that_ran() -> None:
    rows = [SettingScore(name, 10, acc, acc, acc) for name, acc in
            (("ICL", 1.0), ("KM-SDCD", 0.85), ("KM-LM", 0.5), ("KM+KE", 0.8))]
    reported = {g["goal"]: g["met"] for g in goals(rows)}
    assert reported == {GOALS[0][0]: True, GOALS[1][0]: True, GOALS[2][0]: False}


def test_kmserve_eval_synthetic_runs_through_the_platform(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "results"
    result = CliRunner().invoke(app, [
        "eval", "synthetic", "--docs", "1", "--train-docs", "2", "--questions", "3", "--min-facts", "4",
        "--max-facts", "5", "--settings", SETTINGS, "--km-steps", "2", "--ke-steps", "2", "--profile", "fast",
        "--retrieval-tokens", "16", "--out", str(out), "--name", "smoke", "--base-model", str(tiny_model_dir),
        "--data-dir", str(tmp_path / "data"), "--train-option", "lr=0.005", "--train-option", "grad_accum=1",
        "--train-option", "ke.mix_lr_scale=20", "--train-option", "check_answers=true",
    ])
    assert result.exit_code == 0, result.output
    with sqlite3.connect(tmp_path / "data" / "kmserve.db") as db:  # every KM was trained with the options given
        configs = [json.loads(row[0])["train"] for row in db.execute("SELECT config FROM adapters WHERE kind = 'km'")]
        (ke,) = [json.loads(row[0])["train"] for row in db.execute("SELECT config FROM adapters WHERE kind = 'ke'")]
    assert configs and all(c["lr"] == 0.005 and c["grad_accum"] == 1 and c["steps"] == 2 for c in configs)
    assert all(c["mix_lr_scale"] == 10.0 for c in configs)  # ke.* options go to the knowledge extractor alone
    assert ke["mix_lr_scale"] == 20 and ke["lr"] != 0.005 and ke["steps"] == 2
    with sqlite3.connect(tmp_path / "data" / "kmserve.db") as db:  # the SDCD data was generated with the answer check
        synthesized = [json.loads(row[0]) for row in db.execute("SELECT result FROM jobs WHERE kind = 'synthesize'")]
    assert synthesized and all(r["check_answers"] is True for r in synthesized)
    payload = json.loads((out / "smoke.json").read_text())
    assert [row["setting"] for row in payload["scores"]] == [s for s in SETTING_NAMES if s in SETTINGS.split(",")]
    assert all(row["count"] == 3 for row in payload["scores"])
    assert len(payload["answers"]) == 3 * len(SETTINGS.split(","))
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "knowledge injection" in result.output
    # the test document got an SDCD and an LM KM (distinct registry versions); each KE training document an SDCD KM
    adapters = payload["meta"]["adapters"]
    (test_doc,) = [v for k, v in adapters.items() if k.startswith("test-")]
    assert test_doc["sdcd"] != test_doc["lm"]
    assert sorted(len(v) for k, v in adapters.items() if k.startswith("train-")) == [2, 2]


@pytest.mark.parametrize("option", ["lr", "lrate=0.1", "=3", "ke.lrate=0.1", "ke.=1"])
def test_a_training_option_must_be_a_known_key_with_a_value(option: str) -> None:
    result = CliRunner().invoke(app, ["eval", "synthetic", "--docs", "1", "--train-option", option])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
