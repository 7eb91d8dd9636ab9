"""The PEFT LoRA adapter format, read without torch: `adapter_config.json` checks, safetensors headers, consistency.

Nothing here loads a tensor: the safetensors header is plain JSON in front of the data, and that is all we parse.
Pickle weight files are refused outright, never opened.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import InvalidAdapterError, UnsafeFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Files whose loading runs pickle; refused by suffix so that nothing ever opens them.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
LORA_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<side>[AB])\.weight$")
ALL_LINEAR = "all-linear"

MSG_FIELD_MISSING = "{name}: field {field!r} is missing"
MSG_FIELD_TYPE = "{name}: field {field!r} must be {expected}, got {value!r}"
MSG_FIELD_UNSUPPORTED = "{name}: field {field!r} = {value!r} is not supported ({why})"
MSG_BAD_HEADER = "{name} is not a valid safetensors file: {detail}"
MSG_BAD_TENSOR = "tensor {tensor!r}: {detail}"

# Config fields that must stay at their PEFT default, with the reason each is refused. kmserve serves plain
# LoRA (A, B, scaling) and combines adapters by rank concatenation; any of these would be silently dropped.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA magnitude vectors cannot be served or concatenated",
    "modules_to_save": "only LoRA A/B weights are stored, not full module copies",
    "lora_bias": "LoRA B biases are not served",
    "trainable_token_indices": "trainable token embeddings are not served",
    "target_parameters": "parameter-targeted LoRA is not served",
    "layer_replication": "layer replication changes the base model",
    "alora_invocation_tokens": "activated LoRA is not served",
    "use_qalora": "QA-LoRA is not served",
}


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a safetensors header: name, dtype, shape and byte range inside the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class LoraSettings:
    """The fields of a validated `adapter_config.json` that decide how the weights are applied."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    base_model_name_or_path: str | None


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: A is [rank, in_features], B is [out_features, rank]."""

    path: str
    rank: int
    alpha: float
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterInfo:
    """What a validated adapter is: its LoRA settings and the shape of every adapted module."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    modules: tuple[LoraModule, ...]
    base_model_name_or_path: str | None
    dtype: str

    @property
    def scaling(self) -> float:
        """The scaling PEFT applies at the default rank: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def refuse_pickles(names: Iterable[str]) -> None:
    """Raise UnsafeFormatError when any file name has a pickle suffix (.bin, .pt, .pth, .pkl, ...)."""
    for name in names:
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeFormatError(name)


def read_config(path: Path) -> dict[str, Any]:
    """Read `adapter_config.json` and validate it; returns the config as written (unknown keys kept)."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise InvalidAdapterError(f"{path.name} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{path.name} must hold a JSON object")
    validate_config(config, name=path.name)
    return config


def validate_config(config: Mapping[str, Any], *, name: str = CONFIG_NAME) -> LoraSettings:
    """Check a PEFT config is a plain LoRA kmserve can serve; errors name the offending field."""
    for field in ("peft_type", "r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise InvalidAdapterError(MSG_FIELD_MISSING.format(name=name, field=field))
    if config["peft_type"] != "LORA":
        raise InvalidAdapterError(MSG_FIELD_UNSUPPORTED.format(
            name=name, field="peft_type", value=config["peft_type"], why="only LORA adapters are served"))
    _refuse_unsupported(config, name)
    return LoraSettings(
        rank=_positive_int(config["r"], name, "r"),
        alpha=_positive_number(config["lora_alpha"], name, "lora_alpha"),
        use_rslora=_bool(config.get("use_rslora", False), name, "use_rslora"),
        target_modules=_target_modules(config["target_modules"], name),
        rank_pattern=_pattern(config.get("rank_pattern"), name, "rank_pattern", _positive_int),
        alpha_pattern=_pattern(config.get("alpha_pattern"), name, "alpha_pattern", _positive_number),
        base_model_name_or_path=_optional_str(config.get("base_model_name_or_path"), name),
    )


def _refuse_unsupported(config: Mapping[str, Any], name: str) -> None:
    for field, why in UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise InvalidAdapterError(MSG_FIELD_UNSUPPORTED.format(
                name=name, field=field, value=config[field], why=why))
    if config.get("bias", "none") != "none":
        raise InvalidAdapterError(MSG_FIELD_UNSUPPORTED.format(
            name=name, field="bias", value=config["bias"], why="base-model biases are not trained or served"))


def _type_error(name: str, field: str, expected: str, value: object) -> InvalidAdapterError:
    return InvalidAdapterError(MSG_FIELD_TYPE.format(name=name, field=field, expected=expected, value=value))


def _positive_int(value: object, name: str, field: str) -> int:
    # bool is an int subclass; `r: true` is a broken file, not rank 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _type_error(name, field, "a positive integer", value)
    return value


def _positive_number(value: object, name: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise _type_error(name, field, "a positive finite number", value)
    return float(value)


def _bool(value: object, name: str, field: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, field, "true or false", value)
    return value


def _optional_str(value: object, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _type_error(name, "base_model_name_or_path", "a string or null", value)
    return value


def _target_modules(value: object, name: str) -> tuple[str, ...] | str:
    if isinstance(value, str):
        _compile(value, name, "target_modules")
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) and item for item in value):
        return tuple(sorted(value))
    raise _type_error(name, "target_modules", "a non-empty list of module names or a regex string", value)


def _pattern(value: object, name: str, field: str, check: Callable[[object, str, str], Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _type_error(name, field, "an object mapping module patterns to values", value)
    for key in value:
        _compile(key, name, field)
    return {key: check(item, name, f"{field}[{key!r}]") for key, item in value.items()}


def _compile(pattern: str, name: str, field: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise _type_error(name, field, f"a valid regular expression ({exc})", pattern) from exc


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Parse and check a safetensors header without reading tensor data; InvalidAdapterError when malformed."""
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise InvalidAdapterError(MSG_BAD_HEADER.format(
                    name=name, detail=f"header length {length} does not fit a file of {size} bytes"))
            raw = handle.read(length)
    except OSError as exc:
        raise InvalidAdapterError(MSG_BAD_HEADER.format(name=name, detail=str(exc))) from exc
    return parse_safetensors_header(raw, data_size=size - 8 - length, name=name)


def parse_safetensors_header(raw: bytes, *, data_size: int, name: str = WEIGHTS_NAME) -> dict[str, TensorSpec]:
    """Check the JSON header of a safetensors file against the size of its data section."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise InvalidAdapterError(MSG_BAD_HEADER.format(name=name, detail=f"header is not JSON ({exc})")) from exc
    if not isinstance(header, dict):
        raise InvalidAdapterError(MSG_BAD_HEADER.format(name=name, detail="header is not a JSON object"))
    header.pop("__metadata__", None)
    specs = {key: _tensor_spec(key, entry, name) for key, entry in header.items()}
    _check_layout(specs.values(), data_size, name)
    return specs


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate keys")
    return dict(pairs)


def _tensor_spec(key: str, entry: object, name: str) -> TensorSpec:
    def bad(detail: str) -> InvalidAdapterError:
        return InvalidAdapterError(MSG_BAD_HEADER.format(name=name, detail=MSG_BAD_TENSOR.format(
            tensor=key, detail=detail)))

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise bad(f"data_offsets {offsets} do not hold {dtype} {shape}")
    return TensorSpec(key, dtype, tuple(shape), begin, end)


def _check_layout(specs: Iterable[TensorSpec], data_size: int, name: str) -> None:
    # Tensors must tile the data section exactly: a gap, overlap or short file means a damaged or forged file.
    position = 0
    for spec in sorted(specs, key=lambda s: (s.start, s.end)):
        if spec.start != position:
            raise InvalidAdapterError(MSG_BAD_HEADER.format(
                name=name, detail=MSG_BAD_TENSOR.format(tensor=spec.name, detail="overlaps or leaves a gap")))
        position = spec.end
    if position != data_size:
        raise InvalidAdapterError(MSG_BAD_HEADER.format(
            name=name, detail=f"tensors cover {position} bytes but the data section has {data_size}"))


def inspect_adapter(config: Mapping[str, Any], tensors: Mapping[str, TensorSpec]) -> AdapterInfo:
    """Validate config and tensor header together and describe the adapter."""
    settings = validate_config(config)
    modules = tuple(_module(settings, path, sides) for path, sides in sorted(_group_by_module(tensors).items()))
    if not modules:
        raise InvalidAdapterError(f"{WEIGHTS_NAME} holds no LoRA tensors")
    dtypes = sorted({spec.dtype for spec in tensors.values()})
    return AdapterInfo(
        rank=settings.rank, alpha=settings.alpha, use_rslora=settings.use_rslora,
        target_modules=settings.target_modules, modules=modules,
        base_model_name_or_path=settings.base_model_name_or_path, dtype=",".join(dtypes),
    )


def inspect_adapter_dir(directory: Path) -> AdapterInfo:
    """Validate a PEFT adapter directory (pickles refused) and describe it, without loading tensors."""
    refuse_pickles(path.name for path in directory.iterdir())
    config = read_config(directory / CONFIG_NAME)
    return inspect_adapter(config, read_safetensors_header(directory / WEIGHTS_NAME))


def _group_by_module(tensors: Mapping[str, TensorSpec]) -> dict[str, dict[str, TensorSpec]]:
    modules: dict[str, dict[str, TensorSpec]] = {}
    for key, spec in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise InvalidAdapterError(MSG_BAD_TENSOR.format(
                tensor=key, detail="is not named base_model.model.<module>.lora_A.weight / .lora_B.weight"))
        if spec.dtype not in FLOAT_DTYPES:
            raise InvalidAdapterError(MSG_BAD_TENSOR.format(tensor=key, detail=f"dtype {spec.dtype} is not float"))
        modules.setdefault(match["path"], {})[match["side"]] = spec
    return modules


def _module(settings: LoraSettings, path: str, sides: Mapping[str, TensorSpec]) -> LoraModule:
    for side in ("A", "B"):
        if side not in sides:
            raise InvalidAdapterError(f"module {path!r} has lora_{'B' if side == 'A' else 'A'} but no lora_{side}")
    a, b = sides["A"], sides["B"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise InvalidAdapterError(f"module {path!r}: lora_A {a.shape} and lora_B {b.shape} must be matrices")
    rank = int(settings.rank_pattern.get(_pattern_key(settings.rank_pattern, path), settings.rank))
    if a.shape[0] != rank or b.shape[1] != rank:
        raise InvalidAdapterError(
            f"module {path!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not have the config's rank {rank}"
            " (lora_A must be [r, in], lora_B [out, r])")
    if not _is_targeted(settings.target_modules, path):
        raise InvalidAdapterError(f"module {path!r} is not matched by target_modules {settings.target_modules!r}")
    alpha = float(settings.alpha_pattern.get(_pattern_key(settings.alpha_pattern, path), settings.alpha))
    return LoraModule(path=path, rank=rank, alpha=alpha, in_features=a.shape[1], out_features=b.shape[0])


def _pattern_key(patterns: Mapping[str, Any], path: str) -> str:
    # Same rule as peft.utils.other.get_pattern_key: the pattern must match a dotted suffix of the module path.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return path


def _is_targeted(targets: tuple[str, ...] | str, path: str) -> bool:
    # Same rule as PEFT's check_target_module_exists; "all-linear" is expanded by PEFT before saving,
    # so a file that still says it cannot be checked here.
    if isinstance(targets, str):
        return targets == ALL_LINEAR or re.fullmatch(targets, path) is not None
    return any(path == target or path.endswith(f".{target}") for target in targets)
