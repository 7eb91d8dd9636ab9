"""Knowledge-module training on the tiny model: it distils held-out behaviour, resumes exactly, and the job handler
registers the result (or stops cleanly) against a real database, store and queue."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForCausalLM

from engines.base import Engine
from engines.tiny_model import CORPUS
from registry.adapters import get_version, latest_version
from registry.aliases import resolve_alias
from registry.config import Settings
from registry.db import make_engine, make_session_factory, migrate, transaction, write_transaction
from registry.documents import DocumentCreate, content_hash, create_document, get_document
from registry.models import DocumentStatus
from registry.queue import JobQueue
from registry.store import AdapterStore
from tests.job_context import HookedContext
from trainer_worker.artifacts import Chunk, ChunkSet, put_json
from trainer_worker.checkpoint import load_checkpoint
from trainer_worker.context import JobCancelled, JobContext, JobPreempted, PermanentJobError
from trainer_worker.dcd import collate, dcd_loss
from trainer_worker.km_data import DcdExample, SyntheticItem, document_data, sdcd_examples, synthetic_data
from trainer_worker.lora_training import KmTrainer, adapter_tensors, assert_clean, lora_attached
from trainer_worker.train_config import TrainConfig, profile_config
from trainer_worker.train_km import base_model, job_config, run, train_overrides

torch.set_num_threads(2)
LINES = [line for line in CORPUS.splitlines() if line.strip()]
CHUNKS = {0: " ".join(LINES[:8]), 1: " ".join(LINES[8:16]), 2: " ".join(LINES[16:])}


def sentence_items() -> list[SyntheticItem]:
    """Synthetic "summaries": the chunks' own sentences, shuffled with a fixed seed."""
    items = [SyntheticItem(index, "summary", part.strip() + ".")
             for index, text in CHUNKS.items() for part in text.split(".") if len(part.strip()) > 10]
    random.Random(1).shuffle(items)
    return items


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny base model and tokenizer from the handler's per-process cache."""
    return base_model(str(tiny_model_dir))  # type: ignore[no-any-return]


def heldout_kl(model: Any, examples: list[DcdExample], pad_id: int) -> float:
    """KL(teacher with context || student without) on examples the run never trained on."""
    model.eval()
    with torch.no_grad():
        return float(dcd_loss(model, collate(examples, pad_id)).kl)


def method_data(method: str, tokenizer: Any, config: TrainConfig) -> tuple[Any, list[DcdExample]]:
    """Training data, and held-out examples: unseen targets (sdcd) or windows of unseen text (ddcd)."""
    if method == "sdcd":
        items = sentence_items()
        limits = {"max_context_tokens": config.max_context_tokens, "max_target_tokens": config.max_target_tokens}
        data = synthetic_data(tokenizer, CHUNKS, items[6:], dev_fraction=0.1, max_dev=8, seed=0, **limits)
        return data, sdcd_examples(tokenizer, CHUNKS, items[:6], **limits)
    split = int(len(CORPUS) * 0.75)
    data = document_data(tokenizer, CORPUS[:split], method=method, window=config.window, target_fraction=0.25,
                         dev_fraction=0.1, max_dev=4)
    heldout = document_data(tokenizer, CORPUS[split:], method=method, window=48, target_fraction=0.25,
                            dev_fraction=0.99, max_dev=8).dev
    return data, heldout


@pytest.mark.parametrize("method", ["sdcd", "ddcd"])
def test_training_brings_the_student_closer_to_the_teacher_on_heldout_targets(
        tiny: tuple[Any, Any], method: str) -> None:
    base, tokenizer = tiny
    config = profile_config("fast", {"method": method, "steps": 30})
    data, heldout = method_data(method, tokenizer, config)
    with lora_attached(base, config) as model:
        before = heldout_kl(model, heldout, tokenizer.pad_token_id)  # the zero-B adapter: the plain base model
        trainer = KmTrainer(model, data, config, tokenizer.pad_token_id)
        state = trainer.fit()
        set_peft_model_state_dict(model, trainer.best_adapter)
        after = heldout_kl(model, heldout, tokenizer.pad_token_id)
    assert_clean(base)
    assert state.step == 30 and state.best_dev_loss is not None and state.tokens_per_s > 0
    print(f"{method}: held-out KL {before:.6f} -> {after:.6f} ({1 - after / before:.1%} lower)")
    assert after <= 0.9 * before


def test_lm_training_lowers_the_next_token_loss(tiny: tuple[Any, Any]) -> None:
    base, tokenizer = tiny
    config = profile_config("fast", {"method": "lm", "steps": 20, "eval_every": 5, "lr": 1e-2})
    data, _ = method_data("lm", tokenizer, config)
    with lora_attached(base, config) as model:
        trainer = KmTrainer(model, data, config, tokenizer.pad_token_id)
        untrained_dev = trainer.evaluate()
        state = trainer.fit()
    first, last = sum(state.losses[:5]) / 5, sum(state.losses[-5:]) / 5
    print(f"lm: train {first:.3f} -> {last:.3f}, dev {untrained_dev:.3f} -> {state.dev_losses}")
    assert last < 0.97 * first  # a random-weight model learns slowly; this is still a clear, steady drop
    assert state.best_dev_loss is not None and state.best_dev_loss < untrained_dev


class StopHere(Exception):  # noqa: N818 - a signal
    """Ends a run between steps, as a killed worker would."""


def test_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    base, tokenizer = tiny
    config = profile_config("fast", {"steps": 6, "eval_every": 2, "checkpoint_every": 3, "batch_size": 2})
    pad = tokenizer.pad_token_id
    with lora_attached(base, config) as model:
        straight = KmTrainer(model, method_data("sdcd", tokenizer, config)[0], config, pad)
        straight.fit()
        expected, expected_best = adapter_tensors(model), straight.best_adapter

    def stop_at_3(state: Any) -> None:
        if state.step == 3:
            raise StopHere

    with lora_attached(base, config) as model, pytest.raises(StopHere):
        KmTrainer(model, method_data("sdcd", tokenizer, config)[0], config, pad).fit(stop_at_3, tmp_path)
    torch.manual_seed(12345)  # disturb the global generator: the resume must restore it
    with lora_attached(base, config) as model:
        resumed = KmTrainer(model, method_data("sdcd", tokenizer, config)[0], config, pad)
        assert resumed.resume(tmp_path) and resumed.state.step == 3
        resumed.fit(checkpoint_dir=tmp_path)
        got = adapter_tensors(model)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0)
        torch.testing.assert_close(resumed.best_adapter[name], expected_best[name], atol=1e-6, rtol=0)
    assert resumed.state.losses == pytest.approx(straight.state.losses, abs=1e-6)
    files = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ""}  # "" is the LATEST pointer; no pickle anywhere


# -- the job handler


@dataclass
class Registry:
    """A real registry in a temp data dir: database, store and queue."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: AdapterStore
    queue: JobQueue


@pytest.fixture
def registry(app_settings: Settings) -> Iterator[Registry]:
    engine = make_engine(app_settings.resolved_database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    yield Registry(app_settings, sessions, AdapterStore.from_settings(app_settings),
                   JobQueue.from_settings(sessions, app_settings))
    engine.dispose()


def add_document(reg: Registry) -> int:
    """A document as ingest and synthesize leave it: text, chunk set and synthetic data in the store."""
    text_uri = reg.store.put_blob(CORPUS.encode(), ".txt").uri
    chunks = [Chunk(index, text, 0, 0) for index, text in CHUNKS.items()]
    chunk_set = ChunkSet(chunks, [], tokenizer="tiny", chunk_tokens=2048, overlap=0.1, retrieval_tokens=256)
    lines = [{"chunk_index": i.chunk_index, "type": "summary", "text": i.target} for i in sentence_items()]
    lines.append({"chunk_index": 0, "type": "qa", "question": "Where does the river start?", "answer": "The hills."})
    synthetic_uri = reg.store.put_blob("\n".join(json.dumps(x) for x in lines).encode(), ".jsonl").uri
    with write_transaction(reg.sessions) as session:
        document, _ = create_document(session, DocumentCreate(
            title="corpus", content_hash=content_hash(CORPUS), size_bytes=len(CORPUS), text_uri=text_uri))
        document.artifacts = {"text": text_uri, "chunks": put_json(reg.store, chunk_set.to_json()),
                              "synthetic": {"k1": {"uri": synthetic_uri, "used_at": "2025-01-01T00:00:00+00:00"}}}
        return document.id


def no_engine() -> Engine:
    raise AssertionError("train_km needs no generation engine")


def start_job(reg: Registry, document_id: int, payload: dict[str, Any], **extra: Any) -> HookedContext:
    reg.queue.enqueue("train_km", payload, document_id=document_id)
    job = reg.queue.claim("w1", ["train_km"])
    assert job is not None
    return HookedContext(job=job, worker_id="w1", queue=reg.queue, sessions=reg.sessions, store=reg.store,
                         settings=reg.settings, engine_provider=no_engine, **extra)


def test_handler_registers_km_versions_and_moves_the_alias(registry: Registry, tiny: tuple[Any, Any],
                                                           tiny_model_dir: Path) -> None:
    document_id = add_document(registry)
    ctx = start_job(registry, document_id, {"train": {"method": "sdcd", "steps": 6, "rank": 4}})
    result = run(ctx)
    lineage = f"km:{document_id}"
    with transaction(registry.sessions) as session:
        adapter = get_version(session, lineage, 1)
        assert resolve_alias(session, lineage).id == adapter.id == result["adapter_id"]
        assert get_document(session, document_id).status == DocumentStatus.READY
    assert (result["version"], adapter.rank, adapter.kind.value, adapter.base_model) == (1, 4, "km", "kmserve-tiny")
    assert adapter.config["method"] == "sdcd" and adapter.config["train"]["steps"] == 6
    assert adapter.metrics["profile"] == "fast" and len(adapter.metrics["loss_history"]) == 6
    assert adapter.metrics["best_dev_loss"] == result["best_dev_loss"] and adapter.metrics["tokens_per_s"] > 0
    assert registry.store.get_blob(adapter.metrics["loss_curve_uri"]).startswith(b"\x89PNG")
    config, tensors = registry.store.load(adapter.uri)
    assert config["base_model_name_or_path"] == registry.settings.base_model and len(tensors) == 2 * 2 * 7
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(registry.store.open(adapter.uri)))
    for name, tensor in get_peft_model_state_dict(served).items():
        assert torch.equal(tensor, tensors[name])
    assert not ctx.checkpoint_dir.exists()
    job = registry.queue.get(ctx.job.id)
    assert job.metrics["step"] == 6 and job.metrics["steps"] == 6 and job.metrics["loss"]
    assert_clean(tiny[0])
    # the worker died after registering, before the job was marked done: the job's next attempt trains nothing
    # and reports the version it registered
    again = run(ctx)
    assert again == result
    with transaction(registry.sessions) as session:
        assert latest_version(session, lineage) == 1 and adapter.config["job_id"] == ctx.job.id

    second = run(start_job(registry, document_id, {"train": {"method": "ddcd"}, "steps": 4}))
    with transaction(registry.sessions) as session:
        assert resolve_alias(session, lineage).id == second["adapter_id"] != adapter.id
        assert get_version(session, lineage, 2).config["method"] == "ddcd"
    assert second["version"] == 2 and second["steps"] == 4
    # a chunk longer than the teacher's context: the job says so in its events
    cut = start_job(registry, document_id, {"train": {"method": "sdcd", "steps": 2, "rank": 4,
                                                      "max_context_tokens": 4}})
    run(cut)
    messages = [e.data.get("message") or "" for e in registry.queue.events_since(cut.job.id) if e.type == "progress"]
    assert any("longer than max_context_tokens=4" in m and m.startswith("training sdcd") for m in messages), messages


def test_cancel_between_steps_stops_without_registering(registry: Registry, tiny: tuple[Any, Any]) -> None:
    document_id = add_document(registry)

    def cancel_at_2(ctx: JobContext, step: int) -> None:
        if step == 2:
            ctx.queue.cancel(ctx.job.id)

    ctx = start_job(registry, document_id, {"train": {"steps": 6}}, hook=cancel_at_2)
    with pytest.raises(JobCancelled):
        run(ctx)
    assert ctx.steps_reported == [0, 1, 2]
    with transaction(registry.sessions) as session:
        assert latest_version(session, f"km:{document_id}") == 0
    assert_clean(tiny[0])


def test_preempted_run_checkpoints_and_the_next_attempt_resumes(registry: Registry, tiny: tuple[Any, Any]) -> None:
    document_id = add_document(registry)

    def stop_at_3(ctx: JobContext, step: int) -> None:
        if step == 3:
            ctx.stop_event.set()

    ctx = start_job(registry, document_id, {"train": {"method": "ddcd", "steps": 6}}, hook=stop_at_3)
    with pytest.raises(JobPreempted):
        run(ctx)
    checkpoint = load_checkpoint(ctx.checkpoint_dir)
    assert checkpoint is not None and checkpoint.meta["step"] == 3
    assert_clean(tiny[0])

    again = HookedContext(job=ctx.job, worker_id="w1", queue=registry.queue, sessions=registry.sessions,
                          store=registry.store, settings=registry.settings, engine_provider=no_engine)
    result = run(again)
    assert again.steps_reported == [0, 4, 5, 6]
    with transaction(registry.sessions) as session:
        adapter = get_version(session, f"km:{document_id}", 1)
    assert adapter.metrics["resumed_from_step"] == 3 and len(adapter.metrics["loss_history"]) == 6
    assert result["steps"] == 6 and not ctx.checkpoint_dir.exists()


def test_gradient_checkpointing_gives_the_same_steps(tiny: tuple[Any, Any]) -> None:
    base, tokenizer = tiny
    losses = []
    for checkpointing in (False, True):
        config = profile_config("fast", {"steps": 2, "gradient_checkpointing": checkpointing})
        with lora_attached(base, config) as model:
            assert base.is_activation_checkpointing == checkpointing
            trainer = KmTrainer(model, method_data("sdcd", tokenizer, config)[0], config, tokenizer.pad_token_id)
            losses.append([trainer.train_step() for _ in range(2)])
        assert_clean(base)
        assert not base.is_activation_checkpointing
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_best_adapter_and_early_stopping_follow_the_dev_loss(tiny: tuple[Any, Any]) -> None:
    base, tokenizer = tiny
    config = profile_config("fast", {"patience": 2})
    with lora_attached(base, config) as model:
        trainer = KmTrainer(model, method_data("sdcd", tokenizer, config)[0], config, tokenizer.pad_token_id)
        for step, dev_loss in [(1, 1.0), (2, 0.8), (3, 0.9), (4, 0.85)]:
            trainer.state.step = step
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).add_(1.0)  # a different adapter each step
            trainer.record_eval(dev_loss)
            if step == 2:
                best = adapter_tensors(model)
            assert trainer.state.stopped_early == (step == 4)
    assert (trainer.state.best_dev_loss, trainer.state.best_step) == (0.8, 2)
    assert all(torch.equal(trainer.best_adapter[name], tensor) for name, tensor in best.items())


def test_the_uploads_chunk_sizes_are_left_to_ingest_and_top_level_fields_win(caplog: pytest.LogCaptureFixture) -> None:
    # ... and the answer check to the synthesize job
    payload = {"train": {"method": "sdcd", "steps": 5, "retrieval_tokens": 64, "chunk_tokens": 512,
                         "check_answers": True}, "steps": 7}
    assert train_overrides(payload) == {"method": "sdcd", "steps": 7}
    with caplog.at_level("WARNING"):
        profile_config("fast", train_overrides(payload))
    assert "unknown training option" not in caplog.text


def test_a_payloads_profile_chooses_the_training_profile_as_it_does_the_synthesis_profile(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, train_profile="fast")
    config, profile = job_config({"train": {"method": "sdcd", "profile": "paper"}}, settings, "cpu")
    assert profile == "paper" and config.max_context_tokens == TrainConfig().max_context_tokens
    assert job_config({"train": {"method": "sdcd"}}, settings, "cpu")[1] == "fast"
    with pytest.raises(PermanentJobError, match="profile"):
        job_config({"train": {"profile": "huge"}}, settings, "cpu")


def test_bad_options_and_missing_artifacts_fail_the_job_for_good(registry: Registry) -> None:
    document_id = add_document(registry)
    cases = [({"train": {"method": "none"}}, "method 'none'"), ({"train": {"rank": 0}}, r"TrainConfig\.rank"),
             ({"synthetic_key": "nope"}, "no synthetic data under key 'nope'")]
    for payload, message in cases:
        with pytest.raises(PermanentJobError, match=message):
            run(start_job(registry, document_id, payload))
    with write_transaction(registry.sessions) as session:
        get_document(session, document_id).artifacts = {}
    with pytest.raises(PermanentJobError, match="has no chunks; run the ingest job first"):
        run(start_job(registry, document_id, {}))
