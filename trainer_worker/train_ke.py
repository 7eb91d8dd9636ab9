"""The `train_ke` job: train a knowledge extractor (KE) on QA about documents whose knowledge modules stay frozen.

Payload (as `POST /admin/train` queues it): `name` (lineage and alias `ke:<name>`), `qa_uri` (a JSONL blob in the store)
or `qa` (the records inline), `multiple_choice`, and training options as train_km reads them (`steps`, `rank`, `lr`,
... at the top level or under `train`). A record is {document_id, question, answer}; with multiple_choice it is
{document_id, question, options, answer: the right option's index or text}. Every document must be the job tenant's
and have a KM alias `km:<id>`; that version is loaded frozen. The loss is next-token cross-entropy on the answer after
the server's closed-book prompt, with the example's own document's KM active, and the per-layer mixing weights train
along with the KE (see `trainer_worker.ke_model`). The KE with the lowest dev loss is stored in PEFT format and
registered as the next version of `ke:<name>`, its layer weights in the config; then the alias moves to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.factory import resolve_base_model
from engines.hf_loading import resolve_device
from engines.prompts import CLOSED_BOOK_PROMPT
from registry.adapters import AdapterCreate, km_lineage, register_adapter
from registry.aliases import get_alias, set_alias
from registry.db import transaction, write_transaction
from registry.documents import get_document
from registry.errors import NotFoundError
from registry.models import AdapterKind
from trainer_worker.checkpoint import remove_checkpoints
from trainer_worker.context import JobContext, JobPreempted, PermanentJobError
from trainer_worker.dcd import collate_side, lm_loss
from trainer_worker.ke_model import WEIGHTS_MODULE, KeModel, ke_model, pad_token_id, score_options, split_weights
from trainer_worker.km_data import DcdExample, ExampleDeck, KmData, chat_prefix, encode
from trainer_worker.lora_training import KmTrainer, TrainState, adapter_tensors, lora_attached, peft_config_dict
from trainer_worker.plots import loss_curve_png
from trainer_worker.train_config import TrainConfig
from trainer_worker.train_km import (
    MODEL_LOCK,
    Registered,
    TrainOutcome,
    base_model,
    job_config,
    registered_earlier,
    served_model_name,
    train_metrics,
    verify_stored,
)

if TYPE_CHECKING:
    import torch
    from sqlalchemy.orm import Session

# The KE learns on the prompt it is served with (engines.prompts is shared with the server).
KE_PREFIX = "ke:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RECENT_LOSSES = 10

MSG_BAD_NAME = "payload.name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit: {name!r}"
MSG_BAD_FLAG = "payload.multiple_choice must be true or false, got {value!r}"
MSG_NO_QA = "the payload names no questions: give qa_uri (a JSONL blob in the store) or qa (a list of records)"
MSG_QA_GONE = "payload.qa_uri {uri} is not in the store"
MSG_NOT_JSONL = "payload.qa_uri {uri} is not JSONL: {detail}"
MSG_BAD_RECORD = "QA record {number}: {detail}"
MSG_TOO_FEW = "a knowledge extractor needs at least 2 QA records (one goes to the dev set), got {count}"
MSG_NO_DOCUMENT = "document {document_id} does not exist"
MSG_NO_KM = "document {document_id} has no knowledge module (no alias km:{document_id}); train it first"
MSG_KM_KIND = "alias km:{document_id} points at a {kind} adapter, not a knowledge module"


def ke_lineage(name: str) -> str:
    """The lineage (and alias) name of a knowledge extractor: `ke:<name>`."""
    return KE_PREFIX + name


@dataclass(frozen=True)
class QaRecord:
    """One training question about a document; `options` only in the multiple-choice variant."""

    document_id: int
    question: str
    answer: str
    options: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        """The question in the closed-book prompt (the user turn)."""
        return CLOSED_BOOK_PROMPT.format(question=self.question)


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string")
    return value.strip()


def _right_option(answer: Any, options: tuple[str, ...]) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise ValueError(f"answer index {answer} is not in 0..{len(options) - 1}")
        return options[answer]
    if isinstance(answer, str) and answer.strip() in options:
        return answer.strip()
    raise ValueError("answer must be the index of an option or its exact text")


def parse_record(record: Any, *, multiple_choice: bool) -> QaRecord:
    """A validated QA record; ValueError names what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError("a record must be a JSON object")
    document_id = record.get("document_id")
    if not isinstance(document_id, int) or isinstance(document_id, bool) or document_id < 1:
        raise ValueError("document_id must be a positive integer")
    question = _text(record, "question")
    if not multiple_choice:
        return QaRecord(document_id, question, _text(record, "answer"))
    options = record.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError("options must be a list of at least 2 non-empty strings")
    choices = tuple(option.strip() for option in options)
    return QaRecord(document_id, question, _right_option(record.get("answer"), choices), choices)


def parse_records(records: Iterable[Any], *, multiple_choice: bool) -> list[QaRecord]:
    """Every record validated; the first bad one raises ValueError with its 1-based number."""
    parsed = []
    for number, record in enumerate(records, start=1):
        try:
            parsed.append(parse_record(record, multiple_choice=multiple_choice))
        except ValueError as exc:
            raise ValueError(MSG_BAD_RECORD.format(number=number, detail=exc)) from exc
    return parsed


def read_records(ctx: JobContext, *, multiple_choice: bool) -> list[QaRecord]:
    """The job's QA records, inline or from the store; bad input fails the job for good."""
    payload = ctx.payload
    try:
        if payload.get("qa") is not None:
            if not isinstance(payload["qa"], list):
                raise ValueError("payload.qa must be a list of records")
            raw = payload["qa"]
        elif payload.get("qa_uri"):
            lines = ctx.store.get_blob(str(payload["qa_uri"])).decode("utf-8").splitlines()
            raw = [json.loads(line) for line in lines if line.strip()]
        else:
            raise PermanentJobError(MSG_NO_QA)
        records = parse_records(raw, multiple_choice=multiple_choice)
    except NotFoundError as exc:
        raise PermanentJobError(MSG_QA_GONE.format(uri=payload.get("qa_uri"))) from exc
    except json.JSONDecodeError as exc:
        raise PermanentJobError(MSG_NOT_JSONL.format(uri=payload.get("qa_uri"), detail=exc)) from exc
    except ValueError as exc:
        raise PermanentJobError(str(exc)) from exc
    if len(records) < 2:
        raise PermanentJobError(MSG_TOO_FEW.format(count=len(records)))
    return records


@dataclass(frozen=True)
class QaExample(DcdExample):
    """Closed-book prompt + answer tokens (the target) on both sides, about one document."""

    document_id: int = 0


def qa_example(tokenizer: Any, record: QaRecord, config: TrainConfig) -> QaExample:
    """The example of a record: the question cut to max_context_tokens, answer + EOS cut to max_target_tokens."""
    question = record.question
    question_ids = encode(tokenizer, question)
    if len(question_ids) > config.max_context_tokens:
        question = tokenizer.decode(question_ids[:config.max_context_tokens])
    prompt = chat_prefix(tokenizer, CLOSED_BOOK_PROMPT.format(question=question))
    # EOS after the answer teaches the KE to stop there, as the prompt asks and as generation ends on the server.
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    target = (encode(tokenizer, record.answer) + eos)[:config.max_target_tokens]
    ids = tuple(prompt + target)
    return QaExample(ids, ids, len(target), record.document_id)


def qa_data(tokenizer: Any, records: Sequence[QaRecord], config: TrainConfig) -> tuple[KmData, list[QaRecord]]:
    """Training examples and a seeded dev split (dev_fraction, at most max_dev_examples); also the dev records."""
    order = list(range(len(records)))
    random.Random(config.seed).shuffle(order)
    wanted = max(1, min(config.max_dev_examples, math.ceil(len(records) * config.dev_fraction)))
    n_dev = min(wanted, len(records) - 1)
    dev_rows, train_rows = sorted(order[:n_dev]), sorted(order[n_dev:])
    examples = [qa_example(tokenizer, record, config) for record in records]
    dev: list[DcdExample] = [examples[i] for i in dev_rows]
    return KmData(ExampleDeck([examples[i] for i in train_rows]), dev), [records[i] for i in dev_rows]


@dataclass
class KeState(TrainState):
    """A run's state plus the multiple-choice dev accuracy at each evaluation ([step, accuracy])."""

    dev_accuracy: list[list[float]] = field(default_factory=list)


def _document_of(example: DcdExample) -> int:
    if not isinstance(example, QaExample):
        raise TypeError(f"a knowledge extractor trains on QaExample, got {type(example).__name__}")
    return example.document_id


class KeTrainer(KmTrainer):
    """The KM trainer's loop on the task loss, each example with its document's KM; KE and layer weights train."""

    def __init__(self, ke: KeModel, data: KmData, config: TrainConfig, tokenizer: Any,
                 dev_choices: Sequence[QaRecord] = ()) -> None:
        self.ke, self.tokenizer = ke, tokenizer
        self.dev_choices = [record for record in dev_choices if record.options]
        super().__init__(ke.model, data, config, pad_token_id(tokenizer))
        self.state: KeState = KeState()

    def param_groups(self) -> list[dict[str, Any]]:
        """The KE's LoRA, and the per-layer weights at `mix_lr_scale` times its learning rate.

        Adam moves a parameter by about lr per step whatever its gradient's size. At the LoRA's rate (the fast
        profile: 40 steps at 1e-3) the weights could move at most 0.04 from their init, 0.5, and the combination
        served every KM at about half the strength it was trained at.
        """
        mixing = {id(p) for p in self.ke.weights.parameters()}
        lora = [p for p in self.model.parameters() if p.requires_grad and id(p) not in mixing]
        return [{"params": lora, "lr_scale": 1.0},
                {"params": list(self.ke.weights.parameters()), "lr_scale": self.config.mix_lr_scale,
                 "weight_decay": 0.0}]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The KE's LoRA tensors and its per-layer weights."""
        return {**adapter_tensors(self.model), **self.ke.tensors()}

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put a snapshot back: LoRA tensors and per-layer weights."""
        self.ke.load_tensors(tensors)
        super().restore({k: v for k, v in tensors.items() if not k.startswith(WEIGHTS_MODULE + ".")})

    def loss(self, examples: Sequence[DcdExample]) -> tuple[torch.Tensor, int]:
        """Cross-entropy over all answer tokens of the batch, each document's examples run with its KM active."""
        groups: dict[int, list[DcdExample]] = {}
        for example in examples:
            groups.setdefault(_document_of(example), []).append(example)
        total: Any = 0.0
        targets = tokens = 0
        for document_id, group in groups.items():
            self.ke.activate(document_id)
            lens = [example.target_len for example in group]
            side = collate_side([example.student_ids for example in group], lens, self.pad_id, self.device)
            with self._autocast():
                # lm_loss is a mean over the group's targets: weigh it by their count to pool all tokens.
                total = total + lm_loss(self.model, side) * sum(lens)
            targets, tokens = targets + sum(lens), tokens + side.tokens
        return total / targets, tokens

    def accuracy(self) -> float:
        """Multiple-choice dev accuracy: the option with the best length-normalised log-likelihood is the pick."""
        correct = 0
        for record in self.dev_choices:
            self.ke.activate(record.document_id)
            scores = score_options(self.model, self.tokenizer, record.prompt, record.options)
            correct += scores.index(max(scores)) == record.options.index(record.answer)
        return correct / len(self.dev_choices)

    def record_eval(self, dev_loss: float) -> None:
        """Record the dev loss (best adapter, early stopping) and, for multiple choice, the dev accuracy."""
        if self.dev_choices:
            self.state.dev_accuracy.append([self.state.step, self.accuracy()])
        super().record_eval(dev_loss)


@dataclass(frozen=True)
class KmRef:
    """The KM version a document's alias points at when the job starts."""

    document_id: int
    adapter_id: int
    version: int
    uri: str


def _km_ref(session: Session, document_id: int, tenant: str) -> KmRef:
    try:
        get_document(session, document_id, tenant=tenant)
    except NotFoundError as exc:
        raise PermanentJobError(MSG_NO_DOCUMENT.format(document_id=document_id)) from exc
    try:
        adapter = get_alias(session, km_lineage(document_id), tenant=tenant).adapter
    except NotFoundError as exc:
        raise PermanentJobError(MSG_NO_KM.format(document_id=document_id)) from exc
    if adapter.kind != AdapterKind.KM:
        raise PermanentJobError(MSG_KM_KIND.format(document_id=document_id, kind=adapter.kind.value))
    return KmRef(document_id, adapter.id, adapter.version, adapter.uri)


def resolve_kms(ctx: JobContext, document_ids: Iterable[int]) -> list[KmRef]:
    """The KM each document's alias points at; each must be the job tenant's document."""
    with transaction(ctx.sessions) as session:
        return [_km_ref(session, document_id, ctx.job.tenant) for document_id in sorted(set(document_ids))]


def _load_kms(ctx: JobContext, ke: KeModel, kms: Sequence[KmRef]) -> None:
    for ref in kms:
        path = ctx.store.open(ref.uri)  # checks the stored files against their manifest
        try:
            ke.load_km(ref.document_id, path)
        except ValueError as exc:
            raise PermanentJobError(str(exc)) from exc


def checkpoint_root(ctx: JobContext, kms: Sequence[KmRef]) -> Path:
    """Where the run checkpoints: per set of KM versions, so a retry after an alias moved starts over."""
    pinned = json.dumps([[ref.document_id, ref.adapter_id] for ref in kms]).encode()
    return ctx.checkpoint_dir / f"kms-{hashlib.sha256(pinned).hexdigest()[:12]}"


def _report(ctx: JobContext, config: TrainConfig, state: TrainState) -> None:
    accuracy = state.dev_accuracy[-1][1] if isinstance(state, KeState) and state.dev_accuracy else None
    metrics = {"loss": state.losses[-RECENT_LOSSES:], "step": state.step, "steps": config.steps,
               "tokens_per_s": round(state.tokens_per_s, 1), "best_dev_loss": state.best_dev_loss,
               "dev_accuracy": accuracy}
    ctx.report(state.step / config.steps, f"training knowledge extractor: step {state.step}/{config.steps}", metrics)


def train(ctx: JobContext, tokenizer: Any, data: KmData, dev_records: Sequence[QaRecord], kms: Sequence[KmRef],
          config: TrainConfig, model_id: str) -> TrainOutcome:
    """Train a fresh KE with the KMs loaded (resuming from the job's checkpoint); on preemption checkpoint, re-raise."""
    root = checkpoint_root(ctx, kms)
    with MODEL_LOCK, lora_attached(base_model(model_id)[0], config) as model, ke_model(model) as ke:
        _load_kms(ctx, ke, kms)
        trainer = KeTrainer(ke, data, config, tokenizer, dev_records)
        resumed = trainer.state.step if trainer.resume(root) else None
        try:
            state = trainer.fit(on_step=lambda s: _report(ctx, config, s), checkpoint_dir=root)
        except JobPreempted:
            trainer.save(root)
            raise
        return TrainOutcome(state, trainer.best_adapter, peft_config_dict(model, model_id), resumed)


def _metrics(outcome: TrainOutcome, config: TrainConfig, profile: str, counts: Mapping[str, int]) -> dict[str, Any]:
    state = outcome.state
    history = state.dev_accuracy if isinstance(state, KeState) else []
    best = [acc for step, acc in history if step == state.best_step]
    return {**train_metrics(outcome, config, profile), "dev_accuracy_history": history,
            "best_dev_accuracy": best[0] if best else None, "examples": dict(counts)}


def _registry_config(weights: Mapping[str, list[float]], kms: Sequence[KmRef], config: TrainConfig,
                     profile: str, multiple_choice: bool) -> dict[str, Any]:
    return {"layer_weights": dict(weights), "train": asdict(config), "profile": profile,
            "multiple_choice": multiple_choice, "documents": [ref.document_id for ref in kms],
            "kms": [{"document_id": r.document_id, "adapter_id": r.adapter_id, "version": r.version} for r in kms]}


def publish(ctx: JobContext, name: str, outcome: TrainOutcome, kms: Sequence[KmRef], config: TrainConfig,
            profile: str, *, multiple_choice: bool, counts: Mapping[str, int]) -> Registered:
    """Store and verify the best KE, register it as the next version of ke:<name> with its weights, move the alias."""
    lora, weights = split_weights(outcome.best_adapter)
    stored = ctx.store.put(outcome.peft_config, lora)
    verify_stored(ctx.store, stored.uri, lora)
    metrics = _metrics(outcome, config, profile, counts)
    png = loss_curve_png(outcome.state.losses, outcome.state.dev_losses, f"ke {name}")
    metrics["loss_curve_uri"] = ctx.store.put_blob(png, ".png").uri
    lineage, tenant = ke_lineage(name), ctx.job.tenant
    with write_transaction(ctx.sessions) as session:
        data = AdapterCreate.from_stored(
            stored, kind=AdapterKind.KE, lineage=lineage, base_model=served_model_name(ctx.settings), tenant=tenant,
            metrics=metrics, config=_registry_config(weights, kms, config, profile, multiple_choice),
            job_id=ctx.job.id,
        )
        adapter = register_adapter(session, data)
        set_alias(session, lineage, adapter.id, tenant=tenant)
        return Registered(adapter.id, adapter.version, metrics, dict(adapter.config))


def _result(name: str, registered: Registered) -> dict[str, Any]:
    """What a finished `train_ke` job reports."""
    metrics, config = registered.metrics, registered.config
    return {"adapter_id": registered.adapter_id, "version": registered.version, "alias": ke_lineage(name),
            "steps": metrics["steps"], "best_dev_loss": metrics["best_dev_loss"],
            "best_dev_accuracy": metrics["best_dev_accuracy"], "profile": config["profile"],
            "documents": config["documents"], "layer_weights": config["layer_weights"],
            "loss_curve_uri": metrics["loss_curve_uri"]}


def _options(payload: Mapping[str, Any]) -> tuple[str, bool]:
    name, flag = payload.get("name"), payload.get("multiple_choice", False)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PermanentJobError(MSG_BAD_NAME.format(name=name))
    if not isinstance(flag, bool):
        raise PermanentJobError(MSG_BAD_FLAG.format(value=flag))
    return name, flag


def run(ctx: JobContext) -> dict[str, Any]:
    """Handler of `train_ke` jobs."""
    # Everything the payload decides is checked before the model loads: bad input fails at once.
    name, multiple_choice = _options(ctx.payload)
    if (earlier := registered_earlier(ctx, ke_lineage(name), ctx.job.tenant)) is not None:
        return _result(name, earlier)
    records = read_records(ctx, multiple_choice=multiple_choice)
    config, profile = job_config({**ctx.payload, "method": "lm"}, ctx.settings, resolve_device().type)
    kms = resolve_kms(ctx, [record.document_id for record in records])
    model_id = resolve_base_model(ctx.settings)
    tokenizer = base_model(model_id)[1]
    data, dev_records = qa_data(tokenizer, records, config)
    counts = {"train": len(records) - len(data.dev), "dev": len(data.dev)}
    ctx.report(0.0, f"training knowledge extractor {name} ({profile} profile, {config.steps} steps, "
                    f"{len(kms)} documents)")
    outcome = train(ctx, tokenizer, data, dev_records, kms, config, model_id)
    registered = publish(ctx, name, outcome, kms, config, profile, multiple_choice=multiple_choice, counts=counts)
    remove_checkpoints(ctx.checkpoint_dir)
    return _result(name, registered)
