"""How a knowledge module is trained: the validated config, the `paper` and `fast` profiles, the LR schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

log = logging.getLogger(__name__)

METHODS = ("sdcd", "ddcd", "lm")
SCHEDULES = ("linear", "cosine")
PROFILES = ("paper", "fast")
# The dataclass defaults are the paper's settings; `fast` finishes in seconds on the tiny model on a CPU. Its context
# still holds a whole page (the synthetic benchmark's documents are 270-300 tokens): a chunk cut short loses facts.
FAST: dict[str, Any] = {
    "steps": 40, "batch_size": 2, "grad_accum": 2, "eval_every": 10, "checkpoint_every": 10, "patience": 3,
    "max_dev_examples": 8, "max_context_tokens": 512, "max_target_tokens": 64, "window": 128,
}
MSG_FIELD = "TrainConfig.{field} must be {requirement}, got {value!r}"
MSG_UNKNOWN_KEY = "ignoring unknown training option %r"


def _require(ok: bool, name: str, requirement: str, value: object) -> None:
    if not ok:
        raise ValueError(MSG_FIELD.format(field=name, requirement=requirement, value=value))


@dataclass
class TrainConfig:
    """How a knowledge module is trained; the defaults are the paper's (profile `paper`)."""

    method: str = "sdcd"
    steps: int = 1500
    rank: int = 16
    alpha: float | None = None  # None: equal to rank (scaling 1)
    dropout: float = 0.05
    lr: float = 1e-3
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 4
    grad_accum: int = 2
    eval_every: int = 50
    checkpoint_every: int = 50
    patience: int = 10
    dev_fraction: float = 0.1
    max_dev_examples: int = 64
    temperature: float = 1.0
    logit_factor: float = 1.0
    hidden_factor: float = 1.0
    max_context_tokens: int = 2048
    max_target_tokens: int = 768
    window: int = 2048
    target_fraction: float = 0.23
    # SDCD: also distil each synthetic QA pair's answer to its question asked closed book (km_data.answer_items)
    answer_targets: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = True
    seed: int = 0
    # A knowledge extractor's per-layer mixing weights learn at mix_lr_scale * lr (knowledge modules ignore it).
    mix_lr_scale: float = 10.0

    def __post_init__(self) -> None:
        _require(self.method in METHODS, "method", f"one of {', '.join(METHODS)}", self.method)
        _require(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        for name in ("steps", "rank", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "patience",
                     "max_dev_examples", "max_context_tokens", "max_target_tokens"):
            _require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        _require(self.window >= 2, "window", "an integer >= 2", self.window)
        for name in ("lr", "grad_clip", "temperature", "mix_lr_scale"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("weight_decay", "logit_factor", "hidden_factor"):
            _require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _require(self.alpha is None or self.alpha > 0, "alpha", "> 0 (or unset: equal to rank)", self.alpha)
        _require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _require(0 < self.dev_fraction < 1, "dev_fraction", "in (0, 1)", self.dev_fraction)
        _require(0 < self.target_fraction < 1, "target_fraction", "in (0, 1)", self.target_fraction)

    @property
    def lora_alpha(self) -> float:
        """LoRA alpha (the rank when unset)."""
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step."""
        return self.batch_size * self.grad_accum


def resolve_profile(setting: str, device_type: str) -> str:
    """`auto` = paper on CUDA, fast elsewhere."""
    if setting == "auto":
        return "paper" if device_type == "cuda" else "fast"
    _require(setting in PROFILES, "profile", f"auto or one of {', '.join(PROFILES)}", setting)
    return setting


def _coerce(name: str, value: Any, default: Any) -> Any:
    kind = float if name == "alpha" else type(default)
    if kind is bool:
        _require(isinstance(value, bool), name, "true or false", value)
        return value
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        converted = None
    wanted = {int: "an integer", float: "a number"}.get(kind, "a string")
    exact = kind is not int or (converted == value and not isinstance(value, bool))
    _require(converted is not None and exact, name, wanted, value)
    return converted


def profile_config(profile: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The profile's config with `overrides` applied (unset values skipped, unknown keys ignored with a warning)."""
    base = TrainConfig(**(FAST if profile == "fast" else {}))
    known = {f.name for f in fields(TrainConfig)}
    changes: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key not in known:
            log.warning(MSG_UNKNOWN_KEY, key)
        elif value is not None:
            changes[key] = _coerce(key, value, getattr(base, key))
    return replace(base, **changes)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of the 0-based optimizer step: linear warmup over warmup_ratio of the steps, then decay."""
    warmup = math.ceil(config.steps * config.warmup_ratio)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (1 - progress)
