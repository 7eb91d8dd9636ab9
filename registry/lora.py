"""LoRA arithmetic on saved PEFT adapters: read, write, and combine several LoRAs into one.

`combine` builds ONE adapter equal to a weighted sum of LoRAs by rank concatenation. For every target module
it stacks A = [A_1; A_2; ...] along the rank dimension and places B = [w_1*s_1*B_1, w_2*s_2*B_2, ...] side
by side, where s_i is adapter i's scaling (alpha/r, or alpha/sqrt(r) for rsLoRA), so that

    B @ A = sum_i w_i * s_i * B_i @ A_i

and the combined adapter has scaling exactly 1 (r = lora_alpha = total rank, use_rslora False). The KM+KE
serving path relies on this being exact: one adapter per request, numerically the same as both active.

Tensors are keyed as PEFT saves them, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
Only safetensors files are read. torch and safetensors are imported lazily: the registry imports without torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import IncompatibleAdaptersError, InvalidAdapterError, UnsafeFormatError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

MSG_UNSUPPORTED = "{label} uses {feature}, which a plain LoRA cannot represent"
MSG_DIFFERENT = "{field} differs between adapters: {values}"
MSG_SHAPE = "module {module} of {label} maps {fan_in} -> {fan_out} features but another adapter maps {other}"
MSG_NO_LAYER = "module {module} has no '.layers.<i>.' index, so per-layer weights of {label} cannot apply to it"
MSG_LAYER_RANGE = "module {module} is in layer {layer} but the per-layer weights of {label} have {count} entries"
MSG_RANK = "module {module} of {label} has rank {rank} but its config says {expected}"
MSG_WEIGHTS_COUNT = "combine() got {adapters} adapters and {weights} weights; give one weight per adapter"

# One weight per adapter: a float for every module, or a sequence indexed by transformer layer number.
Weight = float | Sequence[float]

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
# PEFT matches rank_pattern/alpha_pattern against the module's name inside the base model, without this prefix.
_PEFT_PREFIX = "base_model.model."
# Config fields that change the forward pass (or save extra tensors) beyond B @ A; any truthy value is refused.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "lora_bias": "lora_bias",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "megatron_config": "Megatron layers (megatron_config)",
}
# Tensor-name fragments that identify a feature when a config did not declare it.
_KEY_FEATURES = (
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    ("lora_embedding_", "embedding LoRA (lora_embedding_A/B)"),
    ("modules_to_save", "modules_to_save"),
    ("base_layer", "saved base-model weights (base_layer)"),
    ("lora_B.bias", "lora_bias"),
)


@dataclass
class LoraWeights:
    """A LoRA adapter in memory: its PEFT config dict and its tensors keyed as PEFT saves them."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def from_dir(cls, path: str | Path) -> LoraWeights:
        """Read `adapter_config.json` and `adapter_model.safetensors` from a PEFT adapter folder."""
        from safetensors.torch import load_file

        folder = Path(path)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            if (folder / PICKLE_WEIGHTS_FILE).exists():
                raise UnsafeFormatError(PICKLE_WEIGHTS_FILE)
            raise InvalidAdapterError(f"{weights} does not exist")
        return cls(config=_read_config(folder / CONFIG_FILE), tensors=load_file(str(weights)))

    def save(self, path: str | Path) -> Path:
        """Write the adapter as a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        # safetensors refuses views; PEFT writes the same "format" metadata.
        tensors = {key: value.contiguous() for key, value in self.tensors.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return folder


@dataclass(frozen=True)
class _Factors:
    """One module of one adapter: A [r, in], B [out, r] and the adapter's scaling for that module."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def scaling(config: Mapping[str, Any]) -> float:
    """The adapter-wide LoRA scaling of a PEFT config: alpha/r, or alpha/sqrt(r) with use_rslora."""
    return _scale(_number(config, "lora_alpha"), _number(config, "r"), bool(config.get("use_rslora")))


def combine(
    adapters: Sequence[LoraWeights], weights: Sequence[Weight], dtype: torch.dtype | None = None
) -> LoraWeights:
    """Build one LoRA equal to sum_i weights[i] * adapters[i] by rank concatenation; its scaling is 1.

    A weight is a float, or a sequence indexed by the layer number parsed from `.layers.<i>.` in the module
    path (per-layer weights); a module without such an index only accepts a float weight. Computation is in
    float32; the output dtype defaults to the dtype of the first adapter's tensors. Adapters lacking a module
    get zero A rows and zero B columns there; each adapter takes a block as wide as its largest module rank,
    so rank_pattern adapters are exact too. target_modules of the result are the module names (last path
    component) holding tensors; PEFT gives any other module those names match a zero lora_B on load.
    """
    import torch

    if not adapters or len(weights) != len(adapters):
        raise ValueError(MSG_WEIGHTS_COUNT.format(adapters=len(adapters), weights=len(weights)))
    parsed = [_parse(adapter, f"adapters[{i}]") for i, adapter in enumerate(adapters)]
    shapes = _module_shapes(parsed)
    widths = [max(factors.a.shape[0] for factors in modules.values()) for modules in parsed]
    config = _combined_config([adapter.config for adapter in adapters], sum(widths), list(shapes))
    out_dtype = dtype or next(iter(adapters[0].tensors.values())).dtype
    tensors: dict[str, torch.Tensor] = {}
    for module, (fan_in, fan_out) in shapes.items():
        a = torch.zeros(sum(widths), fan_in, dtype=torch.float32)
        b = torch.zeros(fan_out, sum(widths), dtype=torch.float32)
        offset = 0
        for i, (modules, weight, width) in enumerate(zip(parsed, weights, widths, strict=True)):
            if module in modules:
                coefficient = _layer_weight(weight, module, f"adapters[{i}]") * modules[module].scale
                _place(a, b, modules[module], coefficient, offset)
            offset += width
        tensors[module + _A_SUFFIX] = a.to(out_dtype)
        tensors[module + _B_SUFFIX] = b.to(out_dtype)
    return LoraWeights(config=config, tensors=tensors)


def _place(a: torch.Tensor, b: torch.Tensor, factors: _Factors, coefficient: float, offset: int) -> None:
    """Copy one adapter's A rows and scaled B columns into the combined block starting at `offset`."""
    rank = factors.a.shape[0]
    a[offset : offset + rank] = factors.a.float()
    b[:, offset : offset + rank] = factors.b.float() * coefficient


def _read_config(path: Path) -> dict[str, Any]:
    """Load an adapter_config.json, turning absence and malformed JSON into InvalidAdapterError."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidAdapterError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise InvalidAdapterError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{path} does not hold a JSON object")
    return config


def _number(config: Mapping[str, Any], field: str) -> float:
    """A positive number from a config, or InvalidAdapterError naming the field."""
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidAdapterError(f"config field {field} must be a positive number, got {value!r}")
    return float(value)


def _scale(alpha: float, rank: float, rslora: bool) -> float:
    """LoRA scaling exactly as PEFT computes it in LoraLayer.update_layer."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(patterns: Mapping[str, Any], module_key: str, default: float) -> float:
    """Resolve a rank_pattern/alpha_pattern entry with PEFT's rule: first key matching a dotted suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return float(value)
    return default


def _check_config(config: Mapping[str, Any], label: str) -> None:
    """Refuse configs whose adapter is not a plain LoRA on linear layers."""
    if config.get("peft_type", "LORA") != "LORA":
        raise IncompatibleAdaptersError(MSG_UNSUPPORTED.format(label=label, feature=config["peft_type"]))
    for field, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise IncompatibleAdaptersError(MSG_UNSUPPORTED.format(label=label, feature=feature))
    if config.get("bias", "none") != "none":
        feature = f"bias={config['bias']!r} (trained base biases)"
        raise IncompatibleAdaptersError(MSG_UNSUPPORTED.format(label=label, feature=feature))


def _split_keys(tensors: Mapping[str, torch.Tensor], label: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pair lora_A/lora_B tensors by module path; refuse any other tensor."""
    a = {key.removesuffix(_A_SUFFIX): value for key, value in tensors.items() if key.endswith(_A_SUFFIX)}
    b = {key.removesuffix(_B_SUFFIX): value for key, value in tensors.items() if key.endswith(_B_SUFFIX)}
    others = sorted(key for key in tensors if not key.endswith((_A_SUFFIX, _B_SUFFIX)))
    if others:
        features = sorted({_feature_of(key) for key in others})
        raise IncompatibleAdaptersError(MSG_UNSUPPORTED.format(label=label, feature=", ".join(features)))
    if not a or a.keys() != b.keys():
        unpaired = sorted(a.keys() ^ b.keys())
        raise InvalidAdapterError(f"{label} has no LoRA tensors or unpaired lora_A/lora_B: {unpaired[:5]}")
    return {module: (a[module], b[module]) for module in sorted(a)}


def _feature_of(key: str) -> str:
    """Name the feature a non-LoRA tensor belongs to, for the refusal message."""
    for fragment, feature in _KEY_FEATURES:
        if fragment in key:
            return feature
    return f"an unexpected tensor {key!r}"


def _parse(adapter: LoraWeights, label: str) -> dict[str, _Factors]:
    """Validate one adapter and return its factors and per-module scaling by module path."""
    config = adapter.config
    _check_config(config, label)
    rank, alpha = _number(config, "r"), _number(config, "lora_alpha")
    rslora = bool(config.get("use_rslora"))
    modules: dict[str, _Factors] = {}
    for module, (a, b) in _split_keys(adapter.tensors, label).items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            feature = f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)} in {module} (not a Linear LoRA)"
            raise IncompatibleAdaptersError(MSG_UNSUPPORTED.format(label=label, feature=feature))
        key = module.removeprefix(_PEFT_PREFIX)
        expected = _pattern_value(config.get("rank_pattern") or {}, key, rank)
        if expected != a.shape[0]:
            raise InvalidAdapterError(MSG_RANK.format(module=module, label=label, rank=a.shape[0], expected=expected))
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, key, alpha)
        modules[module] = _Factors(a=a, b=b, scale=_scale(module_alpha, a.shape[0], rslora))
    return modules


def _module_shapes(parsed: Sequence[Mapping[str, _Factors]]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every module in any adapter; refuse a module whose shape differs."""
    shapes: dict[str, tuple[int, int]] = {}
    for i, modules in enumerate(parsed):
        for module, factors in modules.items():
            shape = (int(factors.a.shape[1]), int(factors.b.shape[0]))
            other = shapes.setdefault(module, shape)
            if other != shape:
                detail = MSG_SHAPE.format(
                    module=module, label=f"adapters[{i}]", fan_in=shape[0], fan_out=shape[1],
                    other=f"{other[0]} -> {other[1]}",
                )
                raise IncompatibleAdaptersError(detail)
    return dict(sorted(shapes.items()))


def _layer_weight(weight: Weight, module: str, label: str) -> float:
    """The weight of one adapter for one module: the float itself, or the entry of the module's layer."""
    if isinstance(weight, int | float):
        return float(weight)
    match = _LAYER_RE.search(module)
    if match is None:
        raise IncompatibleAdaptersError(MSG_NO_LAYER.format(module=module, label=label))
    layer = int(match.group(1))
    if layer >= len(weight):
        detail = MSG_LAYER_RANGE.format(module=module, layer=layer, label=label, count=len(weight))
        raise IncompatibleAdaptersError(detail)
    return float(weight[layer])


def _common(configs: Sequence[Mapping[str, Any]], field: str) -> Any:
    """The one non-null value of `field` across configs (None if none is set); refuse two different ones."""
    values = {json.dumps(config.get(field), sort_keys=True) for config in configs if config.get(field) is not None}
    if len(values) > 1:
        raise IncompatibleAdaptersError(MSG_DIFFERENT.format(field=field, values=", ".join(sorted(values))))
    return json.loads(values.pop()) if values else None


def _combined_config(configs: Sequence[Mapping[str, Any]], rank: int, modules: Sequence[str]) -> dict[str, Any]:
    """PEFT LoraConfig dict of the combined adapter: scaling 1, no dropout, union of target modules."""
    return {
        "peft_type": "LORA",
        "task_type": _common(configs, "task_type"),
        "base_model_name_or_path": _common(configs, "base_model_name_or_path"),
        "revision": _common(configs, "revision"),
        "fan_in_fan_out": bool(_common(configs, "fan_in_fan_out")),
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in modules}),
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
