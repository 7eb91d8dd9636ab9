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


def engine_config(settings: Settings) -> EngineConfig:
    """The engine tunables the settings give (KMSERVE_ENGINE_*)."""
    return EngineConfig(max_loaded_adapters=settings.engine_max_loaded_adapters,
                        max_batch_size=settings.engine_max_batch_size)


def vllm_config_of(settings: Settings) -> VLLMConfig:
    """vLLM's own tunables the settings give (KMSERVE_VLLM_*)."""
    from engines.vllm import VLLMConfig

    return VLLMConfig(max_loras=settings.vllm_max_loras, max_lora_rank=settings.vllm_max_lora_rank,
                      gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                      max_model_len=settings.vllm_max_model_len)


def create_engine(
    settings: Settings, config: EngineConfig | None = None, vllm_config: VLLMConfig | None = None
) -> Engine:
    """The engine KMSERVE_ENGINE selects (auto: vLLM with CUDA and vllm installed, else transformers + PEFT), tuned
    by the settings unless `config` / `vllm_config` are given."""
    model = resolve_base_model(settings)
    config = config or engine_config(settings)
    if select_engine(settings) == "vllm":
        from engines.vllm import VLLMEngine

        return VLLMEngine.from_model(model, config, vllm_config or vllm_config_of(settings))
    from engines.hf import HFEngine

    return HFEngine.from_pretrained(model, config)
