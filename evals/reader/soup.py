"""Average readers' weights (a model soup): `python -m evals.reader.soup --out DIR A=0.3 B=0.7`.

Readers trained on from one another (the phases of `evals/reader/warm_start`, the arms run from one of them) stay in
one basin of the loss, so a weighted mean of their weights is a model too, and often a better one than any of them:
phase 5 looks up value-first facts best, phase 7 entity-first ones, and their mean does both better than either
alone does overall. The ingredients must share the architecture and the tokenizer (a continued run keeps both); the
soup's `RECIPE.json` records every ingredient's weight, weights hash and own recipe, so the chain of commands behind
it stays on record, and the soup's own hash, as `train` does. Choose the weights on a validation seed
(`evaluate --seed`), not on the held-out documents that report the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
# what must be the same in every ingredient for their weights to mean the same thing
SHARED_FILES = ("config.json", "tokenizer.json")
# written by whichever transformers saved the weights: not part of what they mean
IGNORED_CONFIG_KEYS = ("transformers_version",)


def _meaning(path: Path, name: str) -> Any:
    """What a shared file says: the config without its writer's version, the tokenizer as it is."""
    if name != "config.json":
        return (path / name).read_bytes()
    config = json.loads((path / name).read_text())
    return {k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}


def parse_ingredient(text: str) -> tuple[Path, float]:
    """`DIR=WEIGHT` (or `DIR`, weight 1) as a path and a positive weight."""
    path, sep, weight = text.rpartition("=")
    if not sep:
        return Path(text), 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"ingredient weight must be a number, got {weight!r} in {text!r}") from None
    if not value > 0:
        raise ValueError(f"ingredient weight must be positive, got {value} in {text!r}")
    return Path(path), value


def soup(ingredients: Sequence[tuple[Path, float]], out: Path, command: str = "") -> dict[str, Any]:
    """Write the weighted mean of the ingredients' weights to `out` with the first one's tokenizer and config;
    return the recipe written next to it. Refuses ingredients whose config, tokenizer or tensors differ."""
    import torch
    from safetensors.torch import load, save_file

    if len(ingredients) < 2:
        raise ValueError("a soup needs at least two ingredients")
    first = ingredients[0][0]
    for path, _ in ingredients:
        for name in (WEIGHTS, *SHARED_FILES):
            if not (path / name).is_file():
                raise ValueError(f"{path} has no {name}: not a saved reader")
        for name in SHARED_FILES:
            if _meaning(path, name) != _meaning(first, name):
                raise ValueError(f"{path}/{name} differs from {first}/{name}: the weights do not mean the same thing")
    total = sum(weight for _, weight in ingredients)
    mean: dict[str, Any] = {}
    dtypes: dict[str, Any] = {}  # the first ingredient's, kept in the soup
    records = []
    for path, weight in ingredients:
        raw = (path / WEIGHTS).read_bytes()
        state = load(raw)  # the bytes hashed are the bytes averaged
        if mean and set(state) != set(mean):
            raise ValueError(f"{path} holds other tensors than {first}")
        for key, value in state.items():
            if key in mean and mean[key].shape != value.shape:
                raise ValueError(f"{path}: {key} is {tuple(value.shape)}, {first} has {tuple(mean[key].shape)}")
            dtypes.setdefault(key, value.dtype)
            part = value.to(torch.float64) * (weight / total)
            mean[key] = part if key not in mean else mean[key] + part
        recipe_file = path / "RECIPE.json"
        records.append({"path": str(path), "weight": weight, "weights_sha256": hashlib.sha256(raw).hexdigest(),
                        "recipe": json.loads(recipe_file.read_text()) if recipe_file.is_file() else None})
    out.mkdir(parents=True, exist_ok=True)
    for item in first.iterdir():
        if item.is_file() and item.name not in (WEIGHTS, "RECIPE.json"):
            shutil.copyfile(item, out / item.name)
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.to(dtypes[k]).contiguous() for k, v in mean.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    digest = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()
    recipe = {"soup": records, "parameters": sum(v.numel() for v in mean.values()), "weights_sha256": digest,
              "command": command}
    (out / "RECIPE.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return recipe


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: prints the soup's hash."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("ingredients", nargs="+", help="DIR=WEIGHT (weights are normalised to sum to one)")
    args = parser.parse_args(argv)
    try:
        ingredients = [parse_ingredient(text) for text in args.ingredients]
        recipe = soup(ingredients, args.out, " ".join(["python -m evals.reader.soup",
                                                        *(sys.argv[1:] if argv is None else argv)]))
    except ValueError as exc:
        parser.error(str(exc))
    print(recipe["weights_sha256"])


if __name__ == "__main__":
    main()
