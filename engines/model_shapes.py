"""The linear layers of a base model, read from its config alone, and checks that an adapter fits them.

The model is instantiated on the meta device: every module and shape exists, no weight is allocated or read, so
this costs milliseconds even for a large model. An uploaded adapter is refused here before anything is stored when
its rank is over the limit, a module it adapts does not exist, or its A/B matrices do not fit the layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

from registry.adapter_files import ALL_LINEAR, AdapterInfo, LoraModule
from registry.errors import InvalidAdapterError, RegistryError

Shapes = Mapping[str, tuple[int, int]]

MSG_RANK_TOO_LARGE = (
    "adapter rank {rank} exceeds this server's limit of {limit} (KMSERVE_MAX_ADAPTER_RANK, and on vLLM "
    "KMSERVE_VLLM_MAX_LORA_RANK); retrain with r <= {limit}."
)
MSG_MODULE_MISSING = (
    "module {module!r} does not exist as a linear layer in the base model {model}; the adapter was trained for "
    "another model."
)
MSG_SHAPE_MISMATCH = (
    "module {module!r}: lora_A is {a} and lora_B is {b}, but the base model {model} maps {in_features} -> "
    "{out_features} there (lora_A must be [r, {in_features}], lora_B [{out_features}, r]); the adapter was trained "
    "for another model."
)
MSG_TARGETS_MISSING = "target_modules {targets} match no linear layer of the base model {model}."


class AdapterRankError(InvalidAdapterError):
    """The adapter's LoRA rank is above the configured maximum."""

    code = "adapter_rank_too_large"

    def __init__(self, rank: int, limit: int) -> None:
        RegistryError.__init__(self, MSG_RANK_TOO_LARGE.format(rank=rank, limit=limit), rank=rank, limit=limit)


class BaseModelMismatchError(InvalidAdapterError):
    """The adapter adapts modules the base model lacks, or its matrices do not fit the base model's layers."""

    code = "adapter_base_mismatch"

    def __init__(self, message: str) -> None:
        RegistryError.__init__(self, message)


def base_module_shapes(model_id_or_path: str) -> dict[str, tuple[int, int]]:
    """Every linear layer of a causal LM: module path -> (in_features, out_features), weights never loaded."""
    return dict(_cached_shapes(model_id_or_path))


@lru_cache(maxsize=8)
def _cached_shapes(model_id_or_path: str) -> tuple[tuple[str, tuple[int, int]], ...]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_id_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = ((name, _linear_shape(module)) for name, module in model.named_modules())
    return tuple((name, shape) for name, shape in shapes if shape is not None)


def _linear_shape(module: object) -> tuple[int, int] | None:
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    if isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out], LoRA still sees in -> out
        return int(module.weight.shape[0]), int(module.nf)
    return None


def check_adapter_fits(info: AdapterInfo, shapes: Shapes, *, model: str, max_rank: int) -> None:
    """Raise when the adapter's rank is over `max_rank` or any module or target does not fit the base model."""
    rank = max(info.rank, *(module.rank for module in info.modules))
    if rank > max_rank:
        raise AdapterRankError(rank, max_rank)
    for module in info.modules:
        _check_module(module, shapes, model)
    _check_targets(info.target_modules, shapes, model)


def _check_module(module: LoraModule, shapes: Shapes, model: str) -> None:
    expected = shapes.get(module.path)
    if expected is None:
        raise BaseModelMismatchError(MSG_MODULE_MISSING.format(module=module.path, model=model))
    if expected != (module.in_features, module.out_features):
        raise BaseModelMismatchError(MSG_SHAPE_MISMATCH.format(
            module=module.path, model=model, in_features=expected[0], out_features=expected[1],
            a=[module.rank, module.in_features], b=[module.out_features, module.rank]))


def _check_targets(targets: tuple[str, ...] | str, shapes: Shapes, model: str) -> None:
    # Same matching rule as PEFT: a name matches a module whose path is it or ends with ".<name>"; a string is a
    # regex over the full path. A name that matches nothing means the adapter was written for another model.
    if targets == ALL_LINEAR:
        return
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, path) for path in shapes) else [targets]
    else:
        missing = [t for t in targets if not any(p == t or p.endswith(f".{t}") for p in shapes)]
    if missing:
        raise BaseModelMismatchError(MSG_TARGETS_MISSING.format(targets=missing, model=model))
