"""Adapter uploads before anything is stored: where the version goes (lineage, alias) and its files staged on disk.

An upload names its two files either as the form fields `adapter_config` and `adapter_model`, or as a `files` list
whose file names are `adapter_config.json` and `adapter_model.safetensors`. Pickle weights are refused by name
before a byte is written; other files (the README.md PEFT writes) are ignored; the total size is capped.

Module-name patterns in the config (a regex `target_modules`, the keys of `rank_pattern` / `alpha_pattern`) are
matched by Python's backtracking `re`, here and again by PEFT when the adapter loads. A pattern such as `(.*)*x`
takes hours against one module name, so patterns that nest repeats, repeat alternations or chain many repeats
are refused, and so are tensors whose module path is longer than any real model's. Weights must be finite and
within half precision's range: a NaN, an infinity or a 1e30 passes every shape check and then breaks every
sampled generation with the adapter.
"""

from __future__ import annotations

import json
import re
import re._constants as sre_constants
import re._parser as sre_parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from registry.adapter_files import (
    ALL_LINEAR,
    CONFIG_NAME,
    FLOAT_DTYPES,
    MSG_BAD_HEADER,
    WEIGHTS_NAME,
    read_safetensors_header,
    refuse_pickles,
)
from registry.adapters import km_lineage
from registry.errors import InvalidAdapterError, RegistryError
from server.errors import PayloadTooLargeError
from server.schemas.adapters import AdapterUploadKind
from server.schemas.common import NAME_PATTERN

COPY_CHUNK_BYTES = 1 << 20
# `alias` values that mean "set no alias" (for km uploads, whose alias is otherwise km:<document_id>).
NO_ALIAS = frozenset({"false", "none"})
NAME_RE = re.compile(NAME_PATTERN)

MSG_MISSING_FILE = (
    "the upload lacks {names}; send the files adapter_config (adapter_config.json) and adapter_model "
    "(adapter_model.safetensors), or both in a `files` list under those names."
)
MSG_DUPLICATE_FILE = "{name} was sent more than once; send each file once."
MSG_KM_NEEDS_DOCUMENT = "a km adapter needs document_id: the document whose knowledge module it is."
MSG_LINEAGE_REQUIRED = "a {kind} adapter needs a lineage, e.g. '{kind}:<name>'."
MSG_BAD_NAME = "{field} {value!r} must be 1-255 letters, digits, '.', '_', ':' or '-', starting with a letter or digit."

MAX_PATTERN_CHARS = 256
MAX_PATTERN_REPEATS = 3
MAX_MODULE_PATH_CHARS = 256
MSG_UNSAFE_PATTERN = (
    "{field} pattern {pattern!r} is refused: {why}, which can take hours to match; "
    "list the module names instead, e.g. [\"q_proj\", \"v_proj\"]."
)
WHY_LONG = f"it is longer than {MAX_PATTERN_CHARS} characters"
WHY_NESTED = "a repeated part of it holds another repeat or an alternation"
WHY_MANY = f"it has more than {MAX_PATTERN_REPEATS} repeats"
MSG_LONG_MODULE = "tensor {name!r} has a name longer than {limit} characters, longer than any served model's modules."
# The largest finite half-precision value: an adapter may be served in float16.
MAX_ABS_WEIGHT = 65504.0
MSG_NOT_FINITE = "tensor {name!r} holds NaN or infinite values; retrain or repair the adapter."
MSG_WEIGHT_RANGE = (
    "tensor {name!r} holds values up to {peak:.3g}, beyond the {limit:g} half precision can hold; "
    "retrain or repair the adapter."
)
_REPEATS = frozenset({sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT})


class InvalidUploadError(RegistryError):
    """The upload form is incomplete or inconsistent (missing file, km without a document, bad lineage)."""

    code = "invalid_upload"
    status = 422


class UnsafePatternError(InvalidAdapterError):
    """A module-name regex of the config could backtrack for hours, or a module path is implausibly long."""

    code = "unsafe_adapter_pattern"


class InvalidWeightsError(InvalidAdapterError):
    """The weights hold NaN, infinities or values no served precision can hold."""

    code = "invalid_adapter_weights"


@dataclass(frozen=True)
class UploadPart:
    """One uploaded file: the adapter file it stands for, the name the client gave it, and its content."""

    name: str
    filename: str
    stream: BinaryIO


@dataclass(frozen=True)
class UploadTarget:
    """Where an uploaded adapter is registered: its kind, lineage, document and the alias to point at it."""

    kind: AdapterUploadKind
    lineage: str
    document_id: int | None
    alias: str | None


def upload_target(
    kind: AdapterUploadKind, *, lineage: str | None, document_id: int | None, alias: str | None
) -> UploadTarget:
    """Check the form fields and fill in the km defaults (lineage and alias `km:<document_id>`)."""
    is_km = kind is AdapterUploadKind.KM
    if is_km and document_id is None:
        raise InvalidUploadError(MSG_KM_NEEDS_DOCUMENT)
    default = km_lineage(document_id) if is_km and document_id is not None else None
    lineage = lineage or default
    if lineage is None:
        raise InvalidUploadError(MSG_LINEAGE_REQUIRED.format(kind=kind.value))
    _check_name("lineage", lineage)
    chosen = default if alias is None else (None if alias.strip().lower() in NO_ALIAS else alias.strip())
    if chosen is not None:
        _check_name("alias", chosen)
    return UploadTarget(kind=kind, lineage=lineage, document_id=document_id, alias=chosen)


def _check_name(field: str, value: str) -> None:
    if not NAME_RE.match(value):
        raise InvalidUploadError(MSG_BAD_NAME.format(field=field, value=value))


def stage_upload(parts: Sequence[UploadPart], directory: Path, *, limit: int) -> None:
    """Write the config and weights into `directory` (pickles refused, total size capped at `limit` bytes)."""
    refuse_pickles(_names(parts))
    budget = limit
    for part in _required(parts):
        budget -= _copy(part, directory / part.name, budget, limit)
    config = _json_object(directory / CONFIG_NAME)
    if config is not None:  # else the format check reports the config first
        check_weights(directory / WEIGHTS_NAME, names_are_matched=check_patterns(config))


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def check_patterns(config: dict[str, Any]) -> bool:
    """Refuse the config's unsafe module-name regexes (UnsafePatternError); True when it has any regex at all."""
    patterns = list(_config_patterns(config))
    for field, pattern in patterns:
        why = pattern_risk(pattern)
        if why is not None:
            raise UnsafePatternError(MSG_UNSAFE_PATTERN.format(field=field, pattern=pattern[:80], why=why))
    return bool(patterns)


def _config_patterns(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != ALL_LINEAR:
        yield "target_modules", targets
    for field in ("rank_pattern", "alpha_pattern"):
        keys = config.get(field)
        if isinstance(keys, dict):
            yield from ((field, key) for key in keys)


def pattern_risk(pattern: str) -> str | None:
    """Why matching `pattern` may backtrack badly (None: it cannot, or it is not a valid regex at all)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return WHY_LONG
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError):
        return None  # the format check reports an invalid regex
    repeats = _count_repeats(parsed, looping=False)
    if repeats is None:
        return WHY_NESTED
    return WHY_MANY if repeats > MAX_PATTERN_REPEATS else None


def _count_repeats(items: Any, *, looping: bool) -> int | None:
    """Variable repeats in a parsed pattern; None when one (or an alternation) sits inside a looping repeat."""
    count = 0
    for op, av in items:
        variable = op in _REPEATS and av[0] != av[1]
        if looping and (variable or op is sre_constants.BRANCH):
            return None
        inner_looping = looping or (op in _REPEATS and av[1] > 1)
        for child in _children(op, av):
            inner = _count_repeats(child, looping=inner_looping)
            if inner is None:
                return None
            count += inner
        count += variable
    return count


def _children(op: Any, av: Any) -> list[Any]:
    if op in _REPEATS:
        return [av[2]]
    if op is sre_constants.SUBPATTERN:
        return [av[3]]
    if op is sre_constants.BRANCH:
        return list(av[1])
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op is sre_constants.ATOMIC_GROUP:
        return [av]
    if op is sre_constants.GROUPREF_EXISTS:
        return [branch for branch in av[1:] if branch is not None]
    return []


def check_weights(weights_path: Path, *, names_are_matched: bool) -> None:
    """Refuse malformed headers, non-finite or out-of-range float weights, and (when regexes will be matched
    against them) tensor names too long to be a real module's. Tensors are read one at a time."""
    specs = read_safetensors_header(weights_path)
    if names_are_matched:
        for name in specs:
            if len(name) > MAX_MODULE_PATH_CHARS:
                raise UnsafePatternError(MSG_LONG_MODULE.format(name=name[:80], limit=MAX_MODULE_PATH_CHARS))
    floats = [name for name, spec in specs.items() if spec.dtype in FLOAT_DTYPES and spec.end > spec.start]
    if floats:
        _check_values(weights_path, floats)


def _check_values(weights_path: Path, names: Sequence[str]) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            for name in names:
                _check_tensor(name, handle.get_tensor(name))
    except SafetensorError as exc:
        raise InvalidAdapterError(MSG_BAD_HEADER.format(name=weights_path.name, detail=str(exc))) from exc


def _check_tensor(name: str, tensor: Any) -> None:
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise InvalidWeightsError(MSG_NOT_FINITE.format(name=name))
    peak = float(tensor.abs().max())
    if peak > MAX_ABS_WEIGHT:
        raise InvalidWeightsError(MSG_WEIGHT_RANGE.format(name=name, peak=peak, limit=MAX_ABS_WEIGHT))


def _names(parts: Iterable[UploadPart]) -> Iterable[str]:
    for part in parts:
        yield part.name
        yield part.filename


def _required(parts: Sequence[UploadPart]) -> list[UploadPart]:
    found: dict[str, UploadPart] = {}
    for part in parts:
        if part.name in found and part.name in (CONFIG_NAME, WEIGHTS_NAME):
            raise InvalidUploadError(MSG_DUPLICATE_FILE.format(name=part.name))
        found.setdefault(part.name, part)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if name not in found]
    if missing:
        raise InvalidUploadError(MSG_MISSING_FILE.format(names=" and ".join(missing)))
    return [found[CONFIG_NAME], found[WEIGHTS_NAME]]


def _copy(part: UploadPart, target: Path, budget: int, limit: int) -> int:
    written = 0
    with target.open("wb") as out:
        while chunk := part.stream.read(COPY_CHUNK_BYTES):
            written += len(chunk)
            if written > budget:
                raise PayloadTooLargeError(limit, "adapter")
            out.write(chunk)
    return written
