"""Tiny real models for tests: a random-weight Llama and real PEFT LoRAs saved with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 128


def tiny_llama(**overrides: int) -> LlamaForCausalLM:
    """A 2-layer Llama with seed-0 random weights (same weights every call)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return LlamaForCausalLM(config).eval()


def save_lora(path: Path, seed: int, model: LlamaForCausalLM | None = None, **kwargs: Any) -> Path:
    """Save a LoRA whose B is random too (PEFT's default B=0 would make every comparison trivial)."""
    base = model if model is not None else tiny_llama()
    torch.manual_seed(seed)
    get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs)).save_pretrained(str(path))
    return path


def save_lora_for(model_dir: Path, path: Path, seed: int, **kwargs: Any) -> Path:
    """Save a random-B LoRA that fits the model saved in `model_dir` (e.g. the served tiny model)."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return save_lora(path, seed, model, **kwargs)
