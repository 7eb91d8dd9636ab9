"""Resumable training state on disk: every tensor in safetensors, everything else in JSON; nothing is ever pickled.

A checkpoint is a directory `step-<n>-<id>/` under the job's checkpoint dir, staged in a temp dir and renamed into
place (os.replace), then published by atomically replacing the one-line file `LATEST` that names it. A crash at
any point leaves `LATEST` naming a complete checkpoint (or absent), never a half-written one; older checkpoints
are removed only after `LATEST` moved on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.store_format import fsync_path, write_durable, writer_versions

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
LATEST = "LATEST"
META_FILE = "state.json"
STEP_PREFIX = "step-"
MSG_FORMAT = "checkpoint {path} has format {found}; this code reads format {expected}"

Tensors = dict[str, "torch.Tensor"]


@dataclass
class Checkpoint:
    """A loaded checkpoint: its JSON state and its tensor groups (one safetensors file per group)."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Tensors]


def save_checkpoint(root: Path, step: int, meta: Mapping[str, Any], tensors: Mapping[str, Tensors]) -> Path:
    """Write a checkpoint atomically and make it the latest; returns its directory."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        for group, values in tensors.items():
            plain = {name: t.detach().contiguous().cpu() for name, t in values.items()}
            save_file(plain, str(stage / f"{group}.safetensors"))
            fsync_path(stage / f"{group}.safetensors")
        record = {"format": FORMAT_VERSION, "step": step, "writer_versions": writer_versions(), **meta}
        write_durable(stage / META_FILE, json.dumps(record, sort_keys=True).encode())
        final = root / f"{STEP_PREFIX}{step:08d}-{uuid.uuid4().hex[:8]}"
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    write_durable(root / f".{LATEST}.tmp", final.name.encode())
    os.replace(root / f".{LATEST}.tmp", root / LATEST)
    fsync_path(root)
    _remove_others(root, keep=final.name)
    return final


def load_checkpoint(root: Path) -> Checkpoint | None:
    """The latest complete checkpoint under `root`, or None when there is none."""
    from safetensors.torch import load_file

    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(MSG_FORMAT.format(path=path, found=meta.get("format"), expected=FORMAT_VERSION))
    tensors = {file.name.removesuffix(".safetensors"): load_file(str(file)) for file in path.glob("*.safetensors")}
    return Checkpoint(path, meta, tensors)


def remove_checkpoints(root: Path) -> None:
    """Delete a job's checkpoint directory (after the job succeeded)."""
    shutil.rmtree(root, ignore_errors=True)


def _remove_others(root: Path, keep: str) -> None:
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != keep and entry.name.startswith((STEP_PREFIX, ".tmp-")):
            shutil.rmtree(entry, ignore_errors=True)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[Tensors, dict[str, Any]]:
    """An optimizer's state as flat tensors (`<param index>.<name>`) and JSON (scalars, param groups)."""
    import torch

    state = optimizer.state_dict()
    tensors: Tensors = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{key: list(v) if isinstance(v, tuple) else v for key, v in group.items()}
              for group in state["param_groups"]]
    tuples = [sorted(key for key, v in group.items() if isinstance(v, tuple)) for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "tuple_keys": tuples, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Tensors, meta: Mapping[str, Any]) -> None:
    """Restore what `optimizer_state` saved into an optimizer over the same parameters."""
    per_param: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        per_param[int(index)][name] = value
    groups = [{key: tuple(v) if key in tuples else v for key, v in group.items()}
              for group, tuples in zip(meta["param_groups"], meta["tuple_keys"], strict=True)]
    optimizer.load_state_dict({"state": dict(per_param), "param_groups": groups})


def rng_state() -> Tensors:
    """The torch generators' states (CPU, and every CUDA device) as tensors."""
    import torch

    states: Tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng(states: Tensors) -> None:
    """Put the torch generators back where `rng_state` found them."""
    import torch

    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda.{i}"] for i in range(len(states) - 1) if f"cuda.{i}" in states]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
