"""Training a knowledge-module LoRA: LoRA on a cached base model, and the resumable train loop.

The loop: AdamW with linear warmup then linear (or cosine) decay, gradient accumulation to the effective batch,
gradient clipping, bf16 autocast on CUDA, a dev evaluation every `eval_every` steps that keeps the adapter with the
lowest dev loss, early stopping after `patience` evaluations without improvement, and checkpoints that resume the
run exactly (same weights as an uninterrupted run with the same seed).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_worker.checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from trainer_worker.dcd import collate, dcd_loss, lm_loss
from trainer_worker.km_data import DcdExample, KmData
from trainer_worker.train_config import MSG_UNKNOWN_KEY, TrainConfig, lr_at

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MSG_NOT_CLEAN = "the base model still holds LoRA layers after the adapter was removed: {names}"


def lora_target_modules(model: Any) -> list[str]:
    """Leaf names of every nn.Linear inside the decoder layers (attention and MLP projections, not lm_head)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError("the model has no list of decoder layers to put LoRA on")
    layers = max(lists, key=len)  # the decoder stack is the longest module list
    return sorted({name.rsplit(".", 1)[-1] for layer in layers for name, module in layer.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def lora_config(model: Any, config: TrainConfig) -> Any:
    """The PEFT LoRA config of a knowledge module on `model`."""
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=lora_target_modules(model), bias="none", task_type="CAUSAL_LM")


def assert_clean(model: Any) -> None:
    """Raise when any LoRA layer is left in a model that should be the plain base model."""
    from peft.tuners.lora import LoraLayer

    left = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if left or hasattr(model, "peft_config"):
        raise RuntimeError(MSG_NOT_CLEAN.format(names=left[:3] or ["peft_config"]))


def _set_checkpointing(model: Any, *, enabled: bool) -> None:
    # Non-reentrant checkpointing needs no input that requires grad, so the frozen embeddings stay frozen.
    # Newer transformers call it activation checkpointing; the old names still work there but warn.
    kwargs = {"use_reentrant": False}
    if not hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
    elif enabled:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.activation_checkpointing_disable()


@contextmanager
def lora_attached(base: Any, config: TrainConfig) -> Iterator[Any]:
    """A fresh PeftModel on `base` (seeded init); afterwards the base is plain again, as it was."""
    import torch
    from peft import get_peft_model

    requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
    torch.manual_seed(config.seed)
    model = get_peft_model(base, lora_config(base, config))
    if config.gradient_checkpointing:
        _set_checkpointing(base, enabled=True)
    try:
        yield model
    finally:
        if config.gradient_checkpointing:
            _set_checkpointing(base, enabled=False)
        model.unload()
        for name, param in base.named_parameters():
            param.requires_grad_(requires_grad[name])
        base.eval()
        assert_clean(base)


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's saved names, copied to the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def peft_config_dict(model: Any, base_model: str) -> dict[str, Any]:
    """The adapter's PEFT config as JSON data (what `save_pretrained` writes), naming `base_model`."""
    import json

    config = model.peft_config["default"].to_dict()
    config.update(base_model_name_or_path=base_model, inference_mode=True)
    # Sets (target_modules) become sorted lists and enums their values, as in PEFT's own adapter_config.json.
    text = json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    plain: dict[str, Any] = json.loads(text)
    return plain


@dataclass
class TrainState:
    """Where a run stands; saved in checkpoints and reported as metrics."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    dev_losses: list[list[float]] = field(default_factory=list)
    best_dev_loss: float | None = None
    best_step: int = 0
    evals_since_best: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0
    stopped_early: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainState:
        """Read saved state; unknown keys are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        for key in set(data) - known:
            log.warning(MSG_UNKNOWN_KEY, key)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def tokens_per_s(self) -> float:
        """Training throughput (teacher and student tokens per second of train steps)."""
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


StepHook = Callable[[TrainState], None]


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero while training on the CPU (set back to the default afterwards)."""
    import torch

    # Tiny probabilities and gradients underflow to subnormals, which CPU kernels process 10x+ slower;
    # values that small are far below what the loss can resolve.
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class KmTrainer:
    """Trains the LoRA of a PeftModel on KM data; evaluates, keeps the best adapter, checkpoints and resumes."""

    def __init__(self, model: Any, data: KmData, config: TrainConfig, pad_id: int) -> None:
        import torch

        self.model, self.data, self.config, self.pad_id = model, data, config, pad_id
        self.device = next(model.parameters()).device
        self.param_names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = data.sampler(config.seed)
        self.state = TrainState()
        self.best_adapter = self.snapshot()

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups; a group's `lr_scale` multiplies the scheduled learning rate."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The trained weights, copied to the CPU: what is kept as the best and what checkpoints hold."""
        return adapter_tensors(self.model)

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put weights taken by `snapshot` back into the model."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, dict(tensors))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.config.bf16 and self.device.type == "cuda":
            autocast: contextlib.AbstractContextManager[Any] = torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            return autocast
        return contextlib.nullcontext()

    def loss(self, examples: Sequence[DcdExample]) -> tuple[torch.Tensor, int]:
        """The method's loss on a micro-batch, and how many tokens it ran through the model."""
        batch = collate(examples, self.pad_id, self.device)
        with self._autocast():
            if self.config.method == "lm":
                return lm_loss(self.model, batch.student), batch.student.tokens
            cfg = self.config
            terms = dcd_loss(self.model, batch, temperature=cfg.temperature, logit_factor=cfg.logit_factor,
                             hidden_factor=cfg.hidden_factor)
            return terms.total, batch.tokens

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
        import torch

        cfg, total = self.config, 0.0
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state.step, cfg) * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            loss, tokens = self.loss(self.sampler.next_batch(cfg.batch_size))
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            self.state.tokens += tokens
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        self.state.losses.append(total)
        return total

    def evaluate(self, examples: Sequence[DcdExample] | None = None) -> float:
        """Mean loss over dev batches (the dev set unless `examples` are given), without dropout or gradients."""
        import torch

        dev = list(self.data.dev if examples is None else examples)
        size = self.config.batch_size
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                losses = [float(self.loss(dev[i:i + size])[0]) for i in range(0, len(dev), size)]
        finally:
            self.model.train(was_training)
        return sum(losses) / len(losses)

    def record_eval(self, dev_loss: float) -> None:
        """Log a dev loss; keep the adapter when it is the best so far; stop early after `patience` without gain."""
        state = self.state
        state.dev_losses.append([state.step, dev_loss])
        if state.best_dev_loss is None or dev_loss < state.best_dev_loss:
            state.best_dev_loss, state.best_step, state.evals_since_best = dev_loss, state.step, 0
            self.best_adapter = self.snapshot()
        else:
            state.evals_since_best += 1
        state.stopped_early = state.evals_since_best >= self.config.patience

    def fit(self, on_step: StepHook | None = None, checkpoint_dir: Path | None = None) -> TrainState:
        """Train to `steps` (or early stop); `on_step` runs after every step and may raise to stop the run."""
        with flush_denormals():
            return self._fit(on_step, checkpoint_dir)

    def _fit(self, on_step: StepHook | None, checkpoint_dir: Path | None) -> TrainState:
        cfg, state = self.config, self.state
        while state.step < cfg.steps and not state.stopped_early:
            started = time.perf_counter()
            self.train_step()
            state.train_seconds += time.perf_counter() - started
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                self.record_eval(self.evaluate())
            state.seconds += time.perf_counter() - started
            if checkpoint_dir is not None and state.step % cfg.checkpoint_every == 0:
                self.save(checkpoint_dir)
            if on_step is not None:
                on_step(state)
        if state.best_dev_loss is None:
            self.record_eval(self.evaluate())
        return state

    def save(self, root: Path) -> Path:
        """Checkpoint everything the run needs to continue exactly."""
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        meta = {"train": asdict(self.state), "sampler": self.sampler.state_dict(), "optimizer": opt_meta,
                "params": self.param_names, "config": asdict(self.config)}
        tensors = {"adapter": self.snapshot(), "best_adapter": self.best_adapter,
                   "optimizer": opt_tensors, "rng": rng_state()}
        return save_checkpoint(root, self.state.step, meta, tensors)

    def resume(self, root: Path) -> bool:
        """Continue from the latest checkpoint under `root`; False when there is none that fits this run."""
        checkpoint = load_checkpoint(root)
        if checkpoint is None:
            return False
        meta = checkpoint.meta
        if meta["params"] != self.param_names or meta["config"] != asdict(self.config):
            log.warning("checkpoint %s was written by another training setup; starting over", checkpoint.path)
            return False
        self.restore(checkpoint.tensors["adapter"])
        load_optimizer_state(self.optimizer, checkpoint.tensors.get("optimizer", {}), meta["optimizer"])
        self.best_adapter = checkpoint.tensors["best_adapter"]
        # The state's own class: a subclass's state keeps the fields it adds.
        self.state = type(self.state).from_json(meta["train"])
        self.sampler.load_state_dict(meta["sampler"])
        restore_rng(checkpoint.tensors["rng"])
        return True
