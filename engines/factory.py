"""Building the configured engine for a process (server or worker) from its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.base import Engine, EngineConfig, select_engine
from engines.default_model import default_model_dir

if TYPE_CHECKING:
    from engines.vllm import VLLMConfig
    from registry.config import Settings


def resolve_base_model(settings: Settings) -> str:
    """KMSERVE_BASE_MODEL, or the default model (the reader; the tiny model when its weights are absent)."""
    return settings.base_model or str(default_model_dir(settings.data_dir))


def create_engine(
    settings: Settings, config: EngineConfig | None = None, vllm_config: VLLMConfig | None = None
) -> Engine:
    """The engine KMSERVE_ENGINE selects (auto: vLLM with CUDA and vllm installed, else transformers + PEFT)."""
    model = resolve_base_model(settings)
    if select_engine(settings) == "vllm":
        from engines.vllm import VLLMEngine

        return VLLMEngine.from_model(model, config, vllm_config)
    from engines.hf import HFEngine

    return HFEngine.from_pretrained(model, config)
