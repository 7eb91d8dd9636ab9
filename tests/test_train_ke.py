"""Knowledge-extractor training on the tiny model: the mixing weights learn, the KMs stay frozen, the task loss falls,
the served KM+KE combination is the trained model, and the job handler registers the KE (or stops cleanly)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForCausalLM

from engines.base import Engine
from registry.adapters import AdapterCreate, get_adapter, km_lineage, latest_version, register_adapter
from registry.aliases import resolve_alias, set_alias
from registry.config import Settings
from registry.db import make_engine, make_session_factory, migrate, transaction, write_transaction
from registry.documents import DocumentCreate, content_hash, create_document
from registry.lora import LoraWeights, combine
from registry.models import AdapterKind
from registry.queue import JobQueue
from registry.store import AdapterStore
from tests.job_context import HookedContext
from tests.tiny import save_lora_for
from trainer_worker.context import JobCancelled, JobContext, JobPreempted, PermanentJobError
from trainer_worker.ke_model import INIT_WEIGHT, KeModel, ke_model, km_adapter_name, score_options
from trainer_worker.km_data import ExampleDeck, chat_prefix, encode
from trainer_worker.lora_training import assert_clean, lora_attached
from trainer_worker.train_config import TrainConfig, profile_config
from trainer_worker.train_ke import CLOSED_BOOK_PROMPT, KeTrainer, parse_records, qa_data, qa_example, run
from trainer_worker.train_km import base_model

torch.set_num_threads(2)
QA = {
    "a": [("Where does the river start?", "In the hills above the town."), ("Which way does the river run?",
          "North to the sea."), ("When is the water high?", "In spring."), ("What is the city called?",
          "Harbor Point.")],
    "b": [("When did the bridge open?", "In the summer of 1902."), ("Why did the factory close?",
          "The price of coal rose too fast."), ("Who wrote the report?", "A team of three engineers and one doctor."),
          ("How many people live in the valley?", "About twelve thousand.")],
}
DOC_IDS = {"a": 1, "b": 2}  # document ids of the trainer-level tests, which need no registry


def qa_records(doc_ids: dict[str, int]) -> list[dict[str, Any]]:
    """The QA set as job records about the given documents."""
    return [{"document_id": doc_ids[key], "question": q, "answer": a} for key, pairs in QA.items() for q, a in pairs]


def mc_records(doc_ids: dict[str, int]) -> list[dict[str, Any]]:
    """The QA set as multiple-choice records: the right answer among two others, given by index or text."""
    answers = [a for pairs in QA.values() for _, a in pairs]
    records = []
    for i, record in enumerate(qa_records(doc_ids)):
        options = [answers[(i + 3) % len(answers)], record["answer"], answers[(i + 5) % len(answers)]]
        records.append({**record, "options": options, "answer": 1 if i % 2 else record["answer"]})
    return records


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny base model and tokenizer from the handlers' per-process cache."""
    return base_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def km_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two knowledge modules (random-B LoRAs on q_proj and v_proj) that fit the tiny model."""
    root = tmp_path_factory.mktemp("kms")
    return {key: save_lora_for(tiny_model_dir, root / key, seed) for key, seed in (("a", 11), ("b", 12))}


def config_for(**overrides: Any) -> TrainConfig:
    """The fast profile, small and quick: rank 4, a high learning rate."""
    return profile_config("fast", {"method": "lm", "rank": 4, "lr": 1e-2, **overrides})


@contextmanager
def ke_trainer(tiny: tuple[Any, Any], km_dirs: dict[str, Path], config: TrainConfig) -> Iterator[KeTrainer]:
    """A KeTrainer on the tiny model with both KMs loaded; the base model is plain again afterwards."""
    base, tokenizer = tiny
    data, dev = qa_data(tokenizer, parse_records(qa_records(DOC_IDS), multiple_choice=False), config)
    with lora_attached(base, config) as model, ke_model(model) as ke:
        for key, path in km_dirs.items():
            ke.load_km(DOC_IDS[key], path)
        yield KeTrainer(ke, data, config, tokenizer, dev)
    assert_clean(base)


def km_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Every KM tensor in the model, by adapter."""
    return {f"{key}:{name}": t.detach().clone() for key, doc in DOC_IDS.items()
            for name, t in get_peft_model_state_dict(model, adapter_name=km_adapter_name(doc)).items()}


@dataclass
class Trained:
    """What one trainer-level run showed."""

    grads: dict[str, torch.Tensor]
    weights: dict[str, list[float]]
    km_frozen: bool
    km_before: dict[str, torch.Tensor]
    km_after: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float


@pytest.fixture(scope="module")
def trained(tiny: tuple[Any, Any], km_dirs: dict[str, Path]) -> Trained:
    with ke_trainer(tiny, km_dirs, config_for(steps=30)) as trainer:
        assert isinstance(trainer.data.source, ExampleDeck)
        examples = trainer.data.source.examples  # the training questions themselves
        km_before, loss_before = km_tensors(trainer.model), trainer.evaluate(examples)
        grads = {}
        for step in (1, 2):
            trainer.train_step()
            grads.update({f"{key}{step}": trainer.ke.weights[key].grad.detach().clone() for key in ("km", "ke")})
        km_params = [p for n, p in trainer.model.named_parameters() if ".km_" in n]
        trainer.fit()
        return Trained(grads, trainer.ke.layer_weights(), not any(p.requires_grad for p in km_params),
                       km_before, km_tensors(trainer.model), loss_before, trainer.evaluate(examples))


def test_layer_weights_get_gradients_and_move_from_their_init(trained: Trained) -> None:
    # The KE starts as PEFT starts a LoRA, B = 0: its delta, and so w_E's gradient, is zero until the first step.
    assert torch.equal(trained.grads["ke1"], torch.zeros(2))
    for key in ("km1", "km2", "ke2"):
        assert trained.grads[key].shape == (2,) and bool((trained.grads[key].abs() > 0).all()), key
    moved = [abs(w - INIT_WEIGHT) for key in ("km", "ke") for w in trained.weights[key]]
    print(f"layer weights after training: {trained.weights}")
    assert min(moved) > 1e-3


def test_knowledge_modules_stay_frozen(trained: Trained) -> None:
    assert trained.km_frozen
    assert trained.km_before.keys() == trained.km_after.keys() and len(trained.km_before) == 2 * 2 * 2 * 2
    for name, tensor in trained.km_before.items():
        assert torch.equal(trained.km_after[name], tensor), name


def test_task_loss_on_the_training_questions_falls(trained: Trained) -> None:
    print(f"task loss {trained.loss_before:.3f} -> {trained.loss_after:.3f}")
    assert trained.loss_after < 0.95 * trained.loss_before


def test_mixing_weights_learn_at_their_own_rate(tiny: tuple[Any, Any], km_dirs: dict[str, Path]) -> None:
    moved = {}
    for scale in (1.0, 10.0):
        with ke_trainer(tiny, km_dirs, config_for(steps=30, lr=1e-3, mix_lr_scale=scale)) as trainer:
            for _ in range(3):
                trainer.train_step()
            lora, mixing = trainer.optimizer.param_groups
            assert mixing["lr"] == pytest.approx(scale * lora["lr"]) and mixing["weight_decay"] == 0.0
            assert {id(p) for p in mixing["params"]} == {id(p) for p in trainer.ke.weights.parameters()}
            weights = trainer.ke.layer_weights()
            moved[scale] = max(abs(w - INIT_WEIGHT) for key in ("km", "ke") for w in weights[key])
    print(f"largest move of a layer weight in 3 steps: {moved}")
    assert moved[10.0] > 3 * moved[1.0] > 0


class StopHere(Exception):  # noqa: N818 - a signal
    """Ends a run between steps, as a killed worker would."""


def test_resumed_run_restores_the_ke_its_layer_weights_and_optimizer(
        tiny: tuple[Any, Any], km_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = config_for(steps=6, eval_every=2, checkpoint_every=3, mix_lr_scale=5.0)
    with ke_trainer(tiny, km_dirs, config) as straight:
        straight.fit()
        expected = straight.snapshot()

    def stop_at_3(state: Any) -> None:
        if state.step == 3:
            raise StopHere

    with ke_trainer(tiny, km_dirs, config) as trainer, pytest.raises(StopHere):
        trainer.fit(stop_at_3, tmp_path)
    with ke_trainer(tiny, km_dirs, config) as resumed:
        assert resumed.resume(tmp_path) and resumed.state.step == 3
        resumed.fit(checkpoint_dir=tmp_path)
        got = resumed.snapshot()
    assert got.keys() == expected.keys() and "layer_weights.km" in got
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0)
    assert resumed.state.losses == pytest.approx(straight.state.losses, abs=1e-6)


class UnigramLM(torch.nn.Module):  # type: ignore[misc]
    """A language model whose next-token distribution is the same at every position: known log-likelihoods."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.log_probs = torch.nn.Parameter(probs.log(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_: Any) -> SimpleNamespace:
        keep = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.log_probs.expand(input_ids.shape[0], keep, -1))


def test_score_options_picks_the_best_mean_log_likelihood_not_the_best_total(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    options = [" town", " north sea", " hills"]
    ids = [encode(tokenizer, option) for option in options]
    assert [len(i) for i in ids] == [1, 2, 1] and len({t for i in ids for t in i}) == 4
    probs = torch.full((len(tokenizer),), 0.05 / (len(tokenizer) - 4))
    for token, p in zip([ids[0][0], *ids[1], ids[2][0]], [0.2, 0.35, 0.35, 0.05], strict=True):
        probs[token] = p
    scores = score_options(UnigramLM(probs), tokenizer, "Where is it?", options)
    assert scores == pytest.approx([math.log(0.2), math.log(0.35), math.log(0.05)], abs=1e-5)
    totals = [s * len(i) for s, i in zip(scores, ids, strict=True)]
    assert scores.index(max(scores)) == 1 and totals.index(max(totals)) == 0  # length normalisation decides


def cpu_model(model_dir: Path) -> Any:
    """A fresh float32 copy of the tiny model on the CPU: exact comparisons, whatever device the cached one is on."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_score_options_matches_an_unpadded_forward_per_option(tiny: tuple[Any, Any], tiny_model_dir: Path) -> None:
    base, tokenizer = cpu_model(tiny_model_dir), tiny[1]
    prompt, options = CLOSED_BOOK_PROMPT.format(question="Where does the river start?"), [
        " In the hills above the town.", " North.", " The price of coal rose too fast, and the factory closed."]
    prefix = chat_prefix(tokenizer, prompt)
    expected = []
    with torch.no_grad():
        for option in options:
            target = encode(tokenizer, option)
            logits = base(input_ids=torch.tensor([prefix + target])).logits[0, len(prefix) - 1:-1]
            expected.append(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None]).mean()))
    assert score_options(base, tokenizer, prompt, options) == pytest.approx(expected, abs=1e-4)


def test_the_ke_trains_on_the_prompt_the_server_sends() -> None:
    from server.services.query import closed_book_messages

    record = parse_records([{"document_id": 1, "question": "Where does the river start?", "answer": "Kel"}],
                           multiple_choice=False)[0]
    assert record.prompt == closed_book_messages("Where does the river start?")[0].content


# -- the job handler, against a real database, store and queue


@dataclass
class Registry:
    """A real registry in a temp data dir, and the documents whose KMs the jobs train with."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: AdapterStore
    queue: JobQueue
    docs: dict[str, int] = field(default_factory=dict)


def add_document(reg: Registry, title: str, km_dir: Path | None = None, tenant: str = "default") -> int:
    """A document; with `km_dir`, that LoRA registered as its KM v1 with alias km:<id>."""
    with write_transaction(reg.sessions) as session:
        document, _ = create_document(session, DocumentCreate(
            title=title, content_hash=content_hash(title), size_bytes=len(title), tenant=tenant))
        if km_dir is not None:
            adapter = register_adapter(session, AdapterCreate.from_stored(
                reg.store.put_dir(km_dir), kind=AdapterKind.KM, lineage=km_lineage(document.id),
                document_id=document.id, tenant=tenant))
            set_alias(session, km_lineage(document.id), adapter.id, tenant=tenant)
        return document.id


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
             km_dirs: dict[str, Path]) -> Iterator[Registry]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("ke-registry") / "data", base_model=str(tiny_model_dir),
                        model_name="kmserve-tiny")
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    reg = Registry(settings, sessions, AdapterStore.from_settings(settings), JobQueue.from_settings(sessions, settings))
    reg.docs = {key: add_document(reg, f"document {key}", path) for key, path in km_dirs.items()}
    yield reg
    engine.dispose()


def no_engine() -> Engine:
    raise AssertionError("train_ke needs no generation engine")


def start_job(reg: Registry, payload: dict[str, Any], **extra: Any) -> HookedContext:
    reg.queue.enqueue("train_ke", payload)
    job = reg.queue.claim("w1", ["train_ke"])
    assert job is not None
    return HookedContext(job=job, worker_id="w1", queue=reg.queue, sessions=reg.sessions, store=reg.store,
                         settings=reg.settings, engine_provider=no_engine, **extra)


@pytest.fixture(scope="module")
def published(registry: Registry, tiny: tuple[Any, Any]) -> dict[str, Any]:
    """A train_ke job run to the end on QA read from the store."""
    blob = "\n".join(json.dumps(record) for record in qa_records(registry.docs)).encode()
    qa_uri = registry.store.put_blob(blob, ".jsonl").uri
    ctx = start_job(registry, {"name": "reader", "qa_uri": qa_uri, "steps": 12, "rank": 4, "lr": 1e-2})
    result = run(ctx)
    assert_clean(tiny[0])
    assert run(ctx) == result  # a retried attempt reports the version it registered (the tests below see one)
    return result


def test_handler_registers_the_ke_with_its_layer_weights_and_moves_the_alias(
        registry: Registry, published: dict[str, Any], tiny: tuple[Any, Any]) -> None:
    with transaction(registry.sessions) as session:
        adapter = get_adapter(session, published["adapter_id"])
        assert resolve_alias(session, "ke:reader").id == adapter.id
    layers = tiny[0].config.num_hidden_layers
    assert (adapter.kind, adapter.lineage, adapter.version, adapter.rank) == (AdapterKind.KE, "ke:reader", 1, 4)
    weights = adapter.config["layer_weights"]
    assert len(weights["km"]) == len(weights["ke"]) == layers and weights == published["layer_weights"]
    assert adapter.config["documents"] == sorted(registry.docs.values()) and adapter.config["train"]["steps"] == 12
    assert [km["version"] for km in adapter.config["kms"]] == [1, 1]
    assert len(adapter.metrics["loss_history"]) == 12 and adapter.metrics["best_dev_loss"] is not None
    assert registry.store.get_blob(adapter.metrics["loss_curve_uri"]).startswith(b"\x89PNG")
    config, tensors = registry.store.load(adapter.uri)
    assert config["r"] == 4 and len(tensors) == 2 * 7 * layers  # A and B on every projection of every layer
    assert not any("layer_weights" in name for name in tensors)

    mc = run(start_job(registry, {"name": "reader", "qa": mc_records(registry.docs), "multiple_choice": True,
                                  "steps": 4, "rank": 4, "dev_fraction": 0.25}))
    with transaction(registry.sessions) as session:
        assert resolve_alias(session, "ke:reader").id == mc["adapter_id"] != adapter.id
        second = get_adapter(session, mc["adapter_id"])
    assert mc["version"] == 2 and second.config["multiple_choice"] is True
    accuracy = second.metrics["dev_accuracy_history"]
    assert len(accuracy) >= 1 and all(0.0 <= acc <= 1.0 for _, acc in accuracy)
    assert mc["best_dev_accuracy"] in [acc for _, acc in accuracy]
    assert_clean(tiny[0])


def test_served_combination_gives_the_training_time_logits(
        registry: Registry, published: dict[str, Any], tiny: tuple[Any, Any], tiny_model_dir: Path,
        tmp_path: Path) -> None:
    from server.services.adapters import mixing_weights
    from server.services.resolver import AdapterRef

    doc = registry.docs["a"]
    with transaction(registry.sessions) as session:
        km, ke = (AdapterRef.of(a) for a in (resolve_alias(session, km_lineage(doc)),
                                              get_adapter(session, published["adapter_id"])))
    weights = mixing_weights(ke)  # what the server mixes with: [w_M per layer, w_E per layer]
    assert all(abs(w - INIT_WEIGHT) > 1e-3 for per_layer in weights for w in per_layer)  # type: ignore[union-attr]
    merged = combine([LoraWeights.from_dir(registry.store.open(ref.uri)) for ref in (km, ke)], weights)
    served = PeftModel.from_pretrained(cpu_model(tiny_model_dir), str(merged.save(tmp_path / "combined"))).eval()
    base, tokenizer = cpu_model(tiny_model_dir), tiny[1]
    record = parse_records(qa_records(registry.docs)[:1], multiple_choice=False)[0]
    sample = torch.tensor([qa_example(tokenizer, record, config_for()).student_ids])
    with torch.no_grad():
        served_logits, base_logits = served(input_ids=sample).logits, base(input_ids=sample).logits
        with lora_attached(base, config_for()) as model, ke_model(model) as mixed:
            trained_logits = training_time_logits(mixed, registry, doc, km.uri, ke.uri, weights, sample)
    assert_clean(base)
    assert (served_logits - base_logits).abs().max() > 1e-2  # KM and KE change the output at all
    torch.testing.assert_close(served_logits, trained_logits, atol=1e-4, rtol=0)


def training_time_logits(mixed: KeModel, reg: Registry, doc: int, km_uri: str, ke_uri: str, weights: Any,
                         sample: torch.Tensor) -> torch.Tensor:
    """Logits of the model as trained: the stored KE and the KM, mixed by the same module that trained them."""
    mixed.load_km(doc, reg.store.open(km_uri))
    set_peft_model_state_dict(mixed.model, reg.store.load(ke_uri)[1])
    mixed.load_tensors({"layer_weights.km": torch.tensor(weights[0]), "layer_weights.ke": torch.tensor(weights[1])})
    mixed.activate(doc)
    mixed.model.eval()
    return mixed.model(input_ids=sample).logits


def test_cancel_between_steps_stops_without_registering(registry: Registry, tiny: tuple[Any, Any]) -> None:
    def cancel_at_2(ctx: JobContext, step: int) -> None:
        if step == 2:
            ctx.queue.cancel(ctx.job.id)

    payload = {"name": "cancelled", "qa": qa_records(registry.docs), "steps": 6, "rank": 4}
    ctx = start_job(registry, payload, hook=cancel_at_2)
    with pytest.raises(JobCancelled):
        run(ctx)
    assert ctx.steps_reported == [0, 1, 2]
    with transaction(registry.sessions) as session:
        assert latest_version(session, "ke:cancelled") == 0
    assert_clean(tiny[0])


def test_preempted_job_checkpoints_and_the_next_attempt_resumes(registry: Registry, tiny: tuple[Any, Any]) -> None:
    def stop_at_3(ctx: JobContext, step: int) -> None:
        if step == 3:
            ctx.stop_event.set()

    ctx = start_job(registry, {"name": "resumed", "qa": qa_records(registry.docs), "steps": 6, "rank": 4},
                    hook=stop_at_3)
    with pytest.raises(JobPreempted):
        run(ctx)
    assert len(list(ctx.checkpoint_dir.glob("kms-*/LATEST"))) == 1  # one checkpoint, keyed by the KM versions
    assert_clean(tiny[0])
    again = HookedContext(job=ctx.job, worker_id="w1", queue=registry.queue, sessions=registry.sessions,
                          store=registry.store, settings=registry.settings, engine_provider=no_engine)
    result = run(again)
    assert again.steps_reported == [0, 4, 5, 6]
    with transaction(registry.sessions) as session:
        adapter = get_adapter(session, result["adapter_id"])
    assert adapter.metrics["resumed_from_step"] == 3 and len(adapter.metrics["loss_history"]) == 6
    assert not ctx.checkpoint_dir.exists()


def test_bad_payloads_fail_the_job_for_good(registry: Registry) -> None:
    docs = registry.docs
    bare = add_document(registry, "no km yet")
    foreign = add_document(registry, "another tenant's", tenant="other")
    two = qa_records(docs)[:2]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "no spaces"}, "payload.name"),
        ({"name": "x"}, "names no questions"),
        ({"name": "x", "qa": [{"document_id": docs["a"], "question": "Why?"}]}, "QA record 1: answer must be"),
        ({"name": "x", "qa": two[:1]}, "at least 2 QA records"),
        ({"name": "x", "qa": [{**r, "document_id": bare} for r in two]}, f"document {bare} has no knowledge module"),
        ({"name": "x", "qa": [{**r, "document_id": foreign} for r in two]}, f"document {foreign} does not exist"),
        ({"name": "x", "qa": [{**r, "options": ["A", "B"], "answer": 2} for r in two], "multiple_choice": True},
         "answer index 2 is not in 0..1"),
        ({"name": "x", "qa": two, "rank": 0}, r"TrainConfig\.rank"),
    ]
    for payload, message in cases:
        with pytest.raises(PermanentJobError, match=message):
            run(start_job(registry, payload))
