"""The `train_km` job: train a document's knowledge module, register it as the next km version and move its alias.

Payload: `train` (as the server queues it: method, steps, rank, ... any TrainConfig field) and the same keys at the
top level, which win; `synthetic_key` picks the synthetic data an sdcd run trains on (default: the latest entry).
The base model is loaded once per process and shared by jobs; every job wraps it in a fresh LoRA and leaves it plain.
A run checkpoints under `ctx.checkpoint_dir` every `checkpoint_every` steps and when preempted, resumes from there on
its next attempt, and removes the directory once the adapter is registered.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from engines.factory import resolve_base_model
from engines.hf_loading import load_causal_lm, load_tokenizer, resolve_device
from registry.adapters import AdapterCreate, km_lineage, register_adapter, registered_by_job
from registry.aliases import set_alias
from registry.db import transaction, write_transaction
from registry.documents import update_document
from registry.models import AdapterKind, Document, DocumentStatus
from trainer_worker.artifacts import latest_synthetic, load_document, read_chunks
from trainer_worker.checkpoint import remove_checkpoints
from trainer_worker.context import JobContext, JobPreempted, PermanentJobError
from trainer_worker.ingest import ChunkingConfig
from trainer_worker.km_data import KmData, document_data, parse_synthetic, synthetic_data
from trainer_worker.lora_training import KmTrainer, TrainState, lora_attached, peft_config_dict
from trainer_worker.plots import loss_curve_png
from trainer_worker.synthesize import CHECK_ANSWERS_OPTION
from trainer_worker.train_config import TrainConfig, profile_config, resolve_profile

if TYPE_CHECKING:
    import torch

    from registry.config import Settings
    from registry.store import AdapterStore

# The name the server gives the built-in model when no base model is configured (server.state.DEFAULT_MODEL_ID).
DEFAULT_MODEL_ID = "kmserve-tiny"
RECENT_LOSSES = 10
MSG_NOTHING_TO_TRAIN = "training method 'none' trains no knowledge module; nothing to do"
MSG_NO_ARTIFACT = "document {document_id} has no {what}; run the {job} job first"
MSG_NO_SYNTHETIC_KEY = "document {document_id} has no synthetic data under key {key!r}"
MSG_BAD_DATA = "cannot build training data for document {document_id}: {detail}"
MSG_NOT_VERIFIED = "the stored adapter {uri} does not read back as written ({detail})"

# The cached base model is wrapped in LoRAs for the length of a job: one training job at a time per process.
MODEL_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def base_model(model: str) -> tuple[Any, Any]:
    """The base model (eval mode, best device) and its tokenizer, loaded once per process."""
    return load_causal_lm(model), load_tokenizer(model)


def train_overrides(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Training options of a payload: its `train` dict (less the chunk sizes, which the upload's ingest job takes from
    it, and the synthesis option the synthesize job takes), then TrainConfig fields at the top level."""
    names = {f.name for f in fields(TrainConfig)}
    chunking = {f.name for f in fields(ChunkingConfig)} | {CHECK_ANSWERS_OPTION}
    train = {k: v for k, v in (payload.get("train") or {}).items() if k not in chunking}
    return {**train, **{k: v for k, v in payload.items() if k in names}}


def job_config(payload: Mapping[str, Any], settings: Settings, device_type: str) -> tuple[TrainConfig, str]:
    """The run's config and profile (the payload's `profile`, else settings.train_profile, resolved for the device);
    bad options fail the job."""
    overrides = train_overrides(payload)
    if overrides.get("method") == "none":
        raise PermanentJobError(MSG_NOTHING_TO_TRAIN)
    try:
        profile = resolve_profile(overrides.pop("profile", None) or settings.train_profile, device_type)
        return profile_config(profile, overrides), profile
    except ValueError as exc:
        raise PermanentJobError(str(exc)) from exc


def _uri(entry: Any) -> str | None:
    # Artifacts are recorded either as a bare URI or as {"uri": ..., ...}.
    return entry.get("uri") if isinstance(entry, Mapping) else entry


def _synthetic_uri(document: Document, key: str | None) -> str:
    artifacts = document.artifacts or {}
    if key is not None:
        entry = (artifacts.get("synthetic") or {}).get(key)
        if entry is None:
            raise PermanentJobError(MSG_NO_SYNTHETIC_KEY.format(document_id=document.id, key=key))
    else:
        latest = latest_synthetic(artifacts)
        if latest is None:
            raise PermanentJobError(MSG_NO_ARTIFACT.format(document_id=document.id, what="synthetic data",
                                                           job="synthesize"))
        entry = latest[1]
    uri = _uri(entry)
    if not uri:
        raise PermanentJobError(MSG_NO_SYNTHETIC_KEY.format(document_id=document.id, key=key))
    return uri


def _required_uri(document: Document, name: str, fallback: str | None = None) -> str:
    uri = _uri((document.artifacts or {}).get(name)) or fallback
    if not uri:
        raise PermanentJobError(MSG_NO_ARTIFACT.format(document_id=document.id, what=name, job="ingest"))
    return uri


def build_data(store: AdapterStore, document: Document, tokenizer: Any, config: TrainConfig,
               synthetic_key: str | None = None) -> KmData:
    """The run's training and dev examples, read from the document's artifacts in the store."""
    try:
        if config.method == "sdcd":
            chunk_set = read_chunks(store, _required_uri(document, "chunks"))
            chunks = {chunk.index: chunk.text for chunk in chunk_set.train_chunks}
            items = parse_synthetic(store.get_blob(_synthetic_uri(document, synthetic_key)))
            return synthetic_data(tokenizer, chunks, items, dev_fraction=config.dev_fraction,
                                  max_dev=config.max_dev_examples, seed=config.seed,
                                  max_context_tokens=config.max_context_tokens,
                                  max_target_tokens=config.max_target_tokens,
                                  answer_targets=config.answer_targets)
        text = store.get_blob(_required_uri(document, "text", document.text_uri)).decode("utf-8", "replace")
        return document_data(tokenizer, text, method=config.method, window=config.window,
                             target_fraction=config.target_fraction, dev_fraction=config.dev_fraction,
                             max_dev=config.max_dev_examples)
    except ValueError as exc:
        raise PermanentJobError(MSG_BAD_DATA.format(document_id=document.id, detail=exc)) from exc


@dataclass
class TrainOutcome:
    """What a finished run hands to publishing."""

    state: TrainState
    best_adapter: dict[str, torch.Tensor]
    peft_config: dict[str, Any]
    resumed_from: int | None


def _report(ctx: JobContext, config: TrainConfig, state: TrainState) -> None:
    metrics = {"loss": state.losses[-RECENT_LOSSES:], "step": state.step, "steps": config.steps,
               "tokens_per_s": round(state.tokens_per_s, 1), "best_dev_loss": state.best_dev_loss}
    ctx.report(state.step / config.steps, f"training {config.method}: step {state.step}/{config.steps}", metrics)


def train(ctx: JobContext, base: Any, tokenizer: Any, data: KmData, config: TrainConfig,
          model_id: str) -> TrainOutcome:
    """Train a fresh LoRA on `base` (resuming from the job's checkpoint); on preemption checkpoint and re-raise."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    with MODEL_LOCK, lora_attached(base, config) as model:
        trainer = KmTrainer(model, data, config, pad_id)
        resumed = trainer.state.step if trainer.resume(ctx.checkpoint_dir) else None
        try:
            state = trainer.fit(on_step=lambda s: _report(ctx, config, s), checkpoint_dir=ctx.checkpoint_dir)
        except JobPreempted:
            trainer.save(ctx.checkpoint_dir)
            raise
        return TrainOutcome(state, trainer.best_adapter, peft_config_dict(model, model_id), resumed)


def verify_stored(store: AdapterStore, uri: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise unless the adapter stored at `uri` reads back with exactly these tensors."""
    import torch

    _, stored = store.load(uri)  # re-reads and checks the manifest's checksums
    if stored.keys() != tensors.keys():
        raise RuntimeError(MSG_NOT_VERIFIED.format(uri=uri, detail="tensor names differ"))
    changed = [name for name, t in tensors.items() if not torch.equal(stored[name], t.to(stored[name].dtype))]
    if changed:
        raise RuntimeError(MSG_NOT_VERIFIED.format(uri=uri, detail=f"{len(changed)} tensors differ"))


def train_metrics(outcome: TrainOutcome, config: TrainConfig, profile: str) -> dict[str, Any]:
    """The registry metrics of a finished run: loss histories, best dev loss, throughput, resume point."""
    state = outcome.state
    return {
        "method": config.method, "profile": profile, "loss_history": [round(x, 6) for x in state.losses],
        "dev_loss_history": [[int(s), round(x, 6)] for s, x in state.dev_losses],
        "best_dev_loss": state.best_dev_loss, "best_step": state.best_step, "steps": state.step,
        "planned_steps": config.steps, "stopped_early": state.stopped_early, "tokens": state.tokens,
        "tokens_per_s": round(state.tokens_per_s, 1), "seconds": round(state.seconds, 3),
        "train_seconds": round(state.train_seconds, 3), "resumed_from_step": outcome.resumed_from,
    }


def served_model_name(settings: Settings) -> str:
    """The base model's name in the registry, as the server names it."""
    return settings.model_name or settings.base_model or DEFAULT_MODEL_ID


def publish(ctx: JobContext, document: Document, outcome: TrainOutcome, config: TrainConfig,
            profile: str) -> tuple[int, int, dict[str, Any]]:
    """Store and verify the best adapter, register it as the next km version, move the alias, mark the doc ready."""
    stored = ctx.store.put(outcome.peft_config, outcome.best_adapter)
    verify_stored(ctx.store, stored.uri, outcome.best_adapter)
    metrics = train_metrics(outcome, config, profile)
    png = loss_curve_png(outcome.state.losses, outcome.state.dev_losses, f"km {document.id} ({config.method})")
    metrics["loss_curve_uri"] = ctx.store.put_blob(png, ".png").uri
    lineage = km_lineage(document.id)
    with write_transaction(ctx.sessions) as session:
        data = AdapterCreate.from_stored(
            stored, kind=AdapterKind.KM, lineage=lineage, base_model=served_model_name(ctx.settings),
            document_id=document.id, tenant=document.tenant, metrics=metrics,
            config={"method": config.method, "profile": profile, "train": asdict(config)},
            job_id=ctx.job.id,
        )
        adapter = register_adapter(session, data)
        set_alias(session, lineage, adapter.id, tenant=document.tenant)
        update_document(session, document.id, tenant=document.tenant, status=DocumentStatus.READY)
        return adapter.id, adapter.version, metrics


@dataclass(frozen=True)
class Registered:
    """A version a job registered, as its result is built from it."""

    adapter_id: int
    version: int
    metrics: dict[str, Any]
    config: dict[str, Any]


def registered_earlier(ctx: JobContext, lineage: str, tenant: str) -> Registered | None:
    """The version of `lineage` this job registered on an earlier attempt, if any: the worker died after registering
    it and before the job was marked done, so the retried job reports that version instead of training again (its
    registration and alias move were one transaction, so both happened). Progress says so; checkpoints are removed."""
    with transaction(ctx.sessions) as session:
        adapter = registered_by_job(session, lineage, ctx.job.id, tenant=tenant)
        if adapter is None:
            return None
        earlier = Registered(adapter.id, adapter.version, dict(adapter.metrics), dict(adapter.config))
    ctx.report(1.0, f"{lineage} version {earlier.version} was registered by this job's earlier attempt; "
                    "not training again")
    remove_checkpoints(ctx.checkpoint_dir)
    return earlier


def run(ctx: JobContext) -> dict[str, Any]:
    """Handler of `train_km` jobs."""
    document = load_document(ctx)
    # Options are checked before the model loads: a bad payload fails at once.
    config, profile = job_config(ctx.payload, ctx.settings, resolve_device().type)
    if (earlier := registered_earlier(ctx, km_lineage(document.id), document.tenant)) is not None:
        return job_result(earlier.adapter_id, earlier.version, document, earlier.metrics, config.method, profile)
    model_id = resolve_base_model(ctx.settings)
    base, tokenizer = base_model(model_id)
    data = build_data(ctx.store, document, tokenizer, config, ctx.payload.get("synthetic_key"))
    ctx.report(0.0, "; ".join([f"training {config.method} ({profile} profile, {config.steps} steps)", *data.notes]))
    outcome = train(ctx, base, tokenizer, data, config, model_id)
    adapter_id, version, metrics = publish(ctx, document, outcome, config, profile)
    remove_checkpoints(ctx.checkpoint_dir)
    return job_result(adapter_id, version, document, metrics, config.method, profile)


def job_result(adapter_id: int, version: int, document: Document, metrics: dict[str, Any], method: str,
               profile: str) -> dict[str, Any]:
    """What a finished `train_km` job reports."""
    return {"adapter_id": adapter_id, "version": version, "alias": km_lineage(document.id),
            "best_dev_loss": metrics["best_dev_loss"], "steps": metrics["steps"], "method": method,
            "profile": profile, "loss_curve_uri": metrics["loss_curve_uri"]}
