"""Synthetic data: QA parsing, prompts and profiles, the resumable checkpoint, and the job on the real tiny engine."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from engines.base import Engine, GenerationResult, Usage
from engines.hf import HFEngine
from registry.config import Settings
from registry.db import make_engine, make_session_factory, transaction, write_transaction
from registry.documents import DocumentCreate, create_document, get_document
from registry.models import Document, Job, JobStatus
from registry.queue import JobQueue
from registry.store import AdapterStore
from tests.worker_proc import fast_config
from trainer_worker.artifacts import latest_synthetic, read_chunks, synthetic_key
from trainer_worker.context import PermanentJobError
from trainer_worker.engine_runtime import PrivateEngineRuntime
from trainer_worker.qa_parsing import QAPair, clean_field, parse_qa
from trainer_worker.synthesis_checkpoint import CHECKPOINT_FILE, SynthesisCheckpoint
from trainer_worker.synthesize import (
    COUNT_KEYS,
    PROFILES,
    PROMPT_VERSION,
    build_prompt,
    check_answers,
    records_of,
    resolve_profile,
)
from trainer_worker.worker import build_worker

WELL_FORMED = "".join(f"<question id='{n}'>When did bridge {n} open?</question>\n<answer id='{n}'>In 190{n}.</answer>\n"
                      for n in range(1, 6))
SENTENCE = "The bridge number {n} opened in the summer of 1902, after four years of work by the town. "


# -- parsing QA pairs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pairs", "dropped"),
    [
        pytest.param(WELL_FORMED, [(f"When did bridge {n} open?", f"In 190{n}.") for n in range(1, 6)], 0,
                     id="well-formed"),
        pytest.param("Sure! Here they are:\n<QUESTION>  Who\n wrote it? </QUESTION>  <Answer>Three   engineers."
                     "</Answer>\nHope this helps.", [("Who wrote it?", "Three engineers.")], 0, id="case-space-extra"),
        pytest.param("<question id='1'>1. Question 1: When?</question><answer id='1'>Answer: 1847.</answer>",
                     [("When?", "1847.")], 0, id="numbering-and-labels"),
        pytest.param("<question>Why?</question><answer>Because the price of coal rose",
                     [("Why?", "Because the price of coal rose")], 0, id="cut-off-answer"),
        pytest.param("<question>Why?</question><answer>Because coal</ans",
                     [("Why?", "Because coal")], 0, id="cut-off-closing-tag"),
        pytest.param("<question>Why?</question><answer>Coal.</answer><question>Where is the",
                     [("Why?", "Coal.")], 1, id="cut-off-question"),
        pytest.param("<answer>orphan</answer><question>A?</question><question>B?</question><answer>b</answer>",
                     [("B?", "b")], 2, id="orphans"),
        pytest.param("<question id='1'>A?</question><question id='2'>B?</question>"
                     "<answer id='2'>b</answer><answer id='1'>a</answer>",
                     [("B?", "b"), ("A?", "a")], 0, id="matched-by-id"),
        pytest.param("<question>Empty?</question><answer>  </answer>", [], 1, id="empty-answer"),
        pytest.param("Question 1: When did it open?\nAnswer 1: In 1902.\nQuestion 2: Who built it?",
                     [("When did it open?", "In 1902.")], 1, id="untagged-labels"),
        pytest.param("ĠtheĠriver 1847 <|eos|> and and", [], 0, id="junk"),
    ],
)
def test_parse_qa(text: str, pairs: list[tuple[str, str]], dropped: int) -> None:
    parsed = parse_qa(text)
    assert parsed.pairs == [QAPair(q, a) for q, a in pairs]
    assert parsed.dropped == dropped


def test_clean_field_keeps_numbers_that_are_the_answer() -> None:
    assert clean_field(" 1847. ") == "1847."
    assert clean_field("2) Q: What is it?") == "What is it?"
    assert clean_field("A cat sat.") == "A cat sat."


# -- prompts, profiles, records -------------------------------------------------------------------------------


def test_prompts_follow_the_paper() -> None:
    from trainer_worker.artifacts import Chunk

    chunk = Chunk(0, "Some passage.", 0, 400)
    summary, qa = build_prompt("summary", chunk), build_prompt("qa", chunk)
    assert summary.startswith("Summarize the following text in around 100 words without omitting any important")
    assert qa.startswith("Create 5 questions that can be answerable from the following text")
    assert "<question id='1'>" in qa and "Some passage." in summary and "Some passage." in qa
    assert "SHORT" in build_prompt("qa", chunk, "SHORT")


def test_profiles(settings: Settings) -> None:
    import torch

    paper, fast = PROFILES["paper"], PROFILES["fast"]
    assert (paper.generations, paper.max_tokens, paper.top_p, paper.temperature) == (16, 768, 0.8, 1.0)
    assert (fast.generations, fast.max_tokens) == (2, 64)
    auto = settings.model_copy(update={"train_profile": "auto"})
    assert resolve_profile(auto) == PROFILES["paper" if torch.cuda.is_available() else "fast"]
    assert resolve_profile(auto, "paper") == paper
    with pytest.raises(PermanentJobError, match="unknown synthesis profile 'huge'"):
        resolve_profile(auto, "huge")


def result(text: str, finish: str = "stop") -> GenerationResult:
    return GenerationResult("r", text, finish, Usage(10, 5), None)  # type: ignore[arg-type]


def test_records_count_what_is_kept_and_dropped() -> None:
    generated = [result("Summary: It is short."), result("  "), result("x", "length")]
    summaries, counts = records_of((3, "summary"), generated)
    assert summaries == [{"chunk_index": 3, "type": "summary", "text": "It is short."},
                         {"chunk_index": 3, "type": "summary", "text": "x"}]
    assert counts == Counter(generations=3, cut_at_max_tokens=1, summaries=2, summaries_dropped=1)
    qa, counts = records_of((1, "qa"), [result(WELL_FORMED + "<question>left over"), result("junk")])
    assert len(qa) == 5 and qa[0] == {"chunk_index": 1, "type": "qa", "question": "When did bridge 1 open?",
                                              "answer": "In 1901."}
    assert (counts["qa_pairs"], counts["qa_pairs_dropped"], counts["qa_generations_without_pairs"]) == (5, 1, 1)


# -- the checkpoint ---------------------------------------------------------------------------------------------


def test_checkpoint_resumes_units_of_the_same_key_only(tmp_path: Path) -> None:
    record = {"chunk_index": 0, "type": "summary", "text": "s"}
    first = SynthesisCheckpoint.open(tmp_path, "key-a")
    first.add((0, "summary"), [record], Counter(summaries=1))
    with (tmp_path / CHECKPOINT_FILE).open("a") as file:
        file.write('{"unit": [0, "qa"], "records": [')  # torn by a crash
    resumed = SynthesisCheckpoint.open(tmp_path, "key-a")
    assert resumed.has((0, "summary")) and not resumed.has((0, "qa"))
    assert resumed.counts == Counter(summaries=1)
    assert resumed.lines([(0, "qa"), (0, "summary")]) == [json.dumps(record) + "\n"]
    assert not SynthesisCheckpoint.open(tmp_path, "key-b").has((0, "summary"))


# -- the job on the tiny engine ----------------------------------------------------------------------------------


@pytest.fixture
def settings(app_settings: Settings, fresh_db_url: str) -> Settings:
    return app_settings.model_copy(update={"database_url": fresh_db_url, "train_profile": "fast"})


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


class Pipeline:
    """Documents uploaded as the server does, and a worker whose engine is built once, counted."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], model_dir: Path) -> None:
        self.settings, self.sessions = settings, sessions
        self.store = AdapterStore.from_settings(settings)
        self.queue = JobQueue.from_settings(sessions, settings)
        self.engines: list[Engine] = []
        self.runtime = PrivateEngineRuntime(lambda: self._build(model_dir))
        self.worker = build_worker(settings, runtime=self.runtime, config=fast_config(once=True))

    def _build(self, model_dir: Path) -> Engine:
        self.engines.append(HFEngine.from_pretrained(str(model_dir)))
        return self.engines[-1]

    def upload(self, text: str, **payload: Any) -> int:
        blob = self.store.put_blob(text.encode(), ".txt")
        with write_transaction(self.sessions) as session:
            document, _ = create_document(session, DocumentCreate(
                title="doc", content_hash=blob.digest, size_bytes=len(text), text_uri=blob.uri))
        self.queue.enqueue("ingest", {"blob_uri": blob.uri, "media_type": "text/plain", **payload},
                           document_id=document.id)
        return document.id

    def synthesize(self, document_id: int, **payload: Any) -> Job:
        job = self.queue.enqueue("synthesize", payload, document_id=document_id)
        self.worker.run()
        return self.queue.get(job.id)

    def document(self, document_id: int) -> Document:
        with transaction(self.sessions) as session:
            return get_document(session, document_id)


@pytest.fixture
def pipeline(settings: Settings, sessions: sessionmaker[Session], tiny_model_dir: Path) -> Iterator[Pipeline]:
    built = Pipeline(settings, sessions, tiny_model_dir)
    yield built
    built.worker.close()


def test_synthesize_stores_jsonl_counts_and_reuses_it(pipeline: Pipeline, settings: Settings) -> None:
    text = "".join(SENTENCE.format(n=n) for n in range(8))
    document_id = pipeline.upload(text, chunk_tokens=64, overlap=0.1)
    job = pipeline.synthesize(document_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    document = pipeline.document(document_id)
    chunks = read_chunks(pipeline.store, document.artifacts["chunks"]).train_chunks
    key, entry = latest_synthetic(document.artifacts) or ("", {})
    assert job.result["synthetic_key"] == key and job.result["reused"] is False
    assert (entry["profile"], entry["model"], entry["uri"]) == ("fast", str(settings.base_model), job.result["uri"])
    counts, per_type = entry["counts"], len(chunks) * PROFILES["fast"].generations
    assert set(counts) == set(COUNT_KEYS) and counts["generations"] == 2 * per_type
    assert counts["summaries"] + counts["summaries_dropped"] == per_type
    assert counts["qa_generations_without_pairs"] <= per_type
    records = [json.loads(line) for line in pipeline.store.get_blob(entry["uri"]).decode().splitlines()]
    assert len(records) == counts["summaries"] + counts["qa_pairs"]
    assert_record_shapes(records, len(chunks))
    assert job.metrics["generations"] == counts["generations"]

    batches = pipeline.engines[0].stats().batches
    again = pipeline.synthesize(document_id)
    assert again.status == JobStatus.SUCCEEDED and again.result["reused"] is True
    assert (again.result["synthetic_key"], again.result["uri"]) == (key, entry["uri"])
    assert len(pipeline.engines) == 1 and pipeline.engines[0].stats().batches == batches  # nothing generated


def assert_record_shapes(records: list[dict[str, Any]], n_chunks: int) -> None:
    for record in records:
        assert 0 <= record["chunk_index"] < n_chunks
        if record["type"] == "summary":
            assert set(record) == {"chunk_index", "type", "text"} and record["text"].strip()
        else:
            assert set(record) == {"chunk_index", "type", "question", "answer"}
            assert record["type"] == "qa" and record["question"] and record["answer"]


def test_a_rerun_resumes_from_the_units_checkpointed(pipeline: Pipeline, settings: Settings) -> None:
    document_id = pipeline.upload("".join(SENTENCE.format(n=n) for n in range(8)), chunk_tokens=64)
    pipeline.worker.run()  # ingest only
    chunks_uri = pipeline.document(document_id).artifacts["chunks"]
    n_chunks = len(read_chunks(pipeline.store, chunks_uri).train_chunks)
    job = pipeline.queue.enqueue("synthesize", {}, document_id=document_id)
    key = synthetic_key(chunks_uri, str(settings.base_model), "fast", PROMPT_VERSION)
    # As a preempted run leaves it: every unit but the last one generated.
    checkpoint = SynthesisCheckpoint.open(settings.data_dir / "checkpoints" / f"job-{job.id}", key)
    for index in range(n_chunks):
        for task in ("summary", "qa")[: 1 if index == n_chunks - 1 else 2]:
            checkpoint.add((index, task), [{"chunk_index": index, "type": "summary", "text": f"kept {index}"}],
                           Counter(generations=2, summaries=1, summaries_dropped=1))
    pipeline.worker.run()
    done = pipeline.queue.get(job.id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert pipeline.engines[0].stats().batched_rows == PROFILES["fast"].generations  # only the last unit ran
    assert done.result["counts"]["generations"] == 2 * 2 * n_chunks
    kept = pipeline.store.get_blob(done.result["uri"]).decode().count('"kept ')
    assert kept == 2 * n_chunks - 1


def test_a_chunk_longer_than_the_context_is_shortened(pipeline: Pipeline) -> None:
    # The tiny model holds 2048 tokens: a 2040-token chunk plus the prompt and 64 new tokens does not fit.
    text = "".join(SENTENCE.format(n=n) for n in range(130))
    document_id = pipeline.upload(text, chunk_tokens=2040)
    job = pipeline.synthesize(document_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result["counts"]["shortened_prompts"] >= 2


def test_synthesize_before_ingest_fails_permanently(pipeline: Pipeline) -> None:
    with write_transaction(pipeline.sessions) as session:
        document, _ = create_document(session, DocumentCreate(title="d", content_hash="0" * 64, size_bytes=1))
    job = pipeline.synthesize(document.id)
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    assert job.error == f"document {document.id} has no chunks yet; its ingest job must succeed first."
    assert pipeline.engines == []  # the engine is built only when something is generated


# -- answer checking ---------------------------------------------------------------------------------------------

READER = Path(__file__).resolve().parents[1] / "evals" / "reader" / "warm_start"


def test_check_answers_option_and_its_key() -> None:
    assert check_answers({}) is False and check_answers({"train": {"check_answers": True}}) is True
    assert check_answers({"check_answers": False, "train": {"check_answers": True}}) is False  # top level wins
    with pytest.raises(PermanentJobError, match="check_answers must be true or false, got 'yes'"):
        check_answers({"train": {"check_answers": "yes"}})
    # data generated before the option existed keeps its key; checked data has its own
    assert synthetic_key("u", "m", "paper", 1) == synthetic_key("u", "m", "paper", 1, checked=False)
    assert synthetic_key("u", "m", "paper", 1, checked=True) != synthetic_key("u", "m", "paper", 1)


@pytest.fixture
def reader_pipeline(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[Pipeline]:
    """The pipeline on the project's reader model, which writes real QA pairs about a document."""
    built = Pipeline(settings, sessions, READER)
    yield built
    built.worker.close()


def test_checked_qa_answers_are_the_models_replies_with_the_chunk_in_context(reader_pipeline: Pipeline,
                                                                            settings: Settings) -> None:
    from engines.base import ChatMessage, GenerationRequest, SamplingParams
    from engines.prompts import reader_prompt
    from evals.synthetic_facts import FactGenerator

    text = FactGenerator(5).document("check", 12).text
    document_id = reader_pipeline.upload(text, chunk_tokens=512)
    job = reader_pipeline.synthesize(document_id, train={"check_answers": True, "profile": "paper"})
    assert job.status == JobStatus.SUCCEEDED, job.error
    document = reader_pipeline.document(document_id)
    chunks = read_chunks(reader_pipeline.store, document.artifacts["chunks"]).train_chunks
    assert len(chunks) == 1
    key = synthetic_key(document.artifacts["chunks"], str(settings.base_model), "paper", PROMPT_VERSION, checked=True)
    entry = document.artifacts["synthetic"][key]
    assert job.result["synthetic_key"] == key and entry["check_answers"] is True
    records = [json.loads(line) for line in reader_pipeline.store.get_blob(entry["uri"]).decode().splitlines()]
    qa = [r for r in records if r["type"] == "qa"]
    assert len(qa) == entry["counts"]["qa_pairs"] >= 20  # 16 generations of up to 5 pairs
    engine = reader_pipeline.engines[0]
    greedy = SamplingParams(max_tokens=48, temperature=0.0)
    replies = engine_replies(engine, [GenerationRequest(
        messages=(ChatMessage("user", reader_prompt(r["question"], [chunks[0].text])),), sampling=greedy)
        for r in qa])
    assert [r["answer"] for r in qa] == [reply.strip() for reply in replies]
    # the sampled pairs were partly wrong: the check replaced those answers (and counted them)
    assert 0 < entry["counts"]["qa_answers_changed"] <= len(qa)

    plain = reader_pipeline.synthesize(document_id, train={"profile": "paper"})
    assert plain.result["reused"] is False and plain.result["synthetic_key"] != key  # not the checked data
    assert plain.result["check_answers"] is False and plain.result["counts"]["qa_answers_changed"] == 0


def engine_replies(engine: Engine, requests: list[Any]) -> list[str]:
    import asyncio

    return [result.text for result in asyncio.run(engine.generate(requests))]
