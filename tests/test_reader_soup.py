"""Model soups of readers: the weighted mean of saved weights, its recipe chain and hash, and what it refuses."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals.reader import soup, train

TINY = train.Recipe(vocab_size=512, hidden_size=32, layers=1, heads=2, head_dim=16, intermediate_size=64,
                    induction_steps=0, steps=1, token_budget=512, max_seq=256, window=4, threads=1)


@pytest.fixture(scope="module")
def readers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two saved readers of one architecture and tokenizer with different weights."""
    tokenizer = train.build_tokenizer(TINY)
    dirs = []
    for seed in (1, 2):
        model = train.build_model(replace(TINY, seed=seed), tokenizer)
        out = tmp_path_factory.mktemp(f"reader{seed}")
        train.save(model, tokenizer, TINY, out, {"seed": seed})
        dirs.append(out)
    return dirs[0], dirs[1]


def test_the_soup_is_the_weighted_mean_with_its_ingredients_on_record(readers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    a, b = readers
    recipe = soup.soup([(a, 1.0), (b, 3.0)], tmp_path, "python -m evals.reader.soup ...")
    wa, wb, mixed = (load_file(str(d / "model.safetensors")) for d in (a, b, tmp_path))
    assert set(mixed) == set(wa)
    for key in wa:
        assert mixed[key].dtype == wa[key].dtype
        torch.testing.assert_close(mixed[key], 0.25 * wa[key] + 0.75 * wb[key])
    assert any(not torch.equal(wa[key], wb[key]) for key in wa), "the ingredients differ"
    saved = json.loads((tmp_path / "RECIPE.json").read_text())
    assert saved == recipe
    assert saved["weights_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert [r["weight"] for r in saved["soup"]] == [1.0, 3.0]
    assert saved["soup"][0]["weights_sha256"] == json.loads((a / "RECIPE.json").read_text())["weights_sha256"]
    assert saved["soup"][1]["recipe"]["log"] == {"seed": 2}, "each ingredient's own recipe chain is kept"
    assert (tmp_path / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # loads as a reader, and a run can continue from it
    assert model.config.hidden_size == 32
    continued = tmp_path / "continued"
    train.train(replace(TINY, steps=1), continued, init_from=tmp_path)
    assert json.loads((continued / "RECIPE.json").read_text())["log"]["previous"]["soup"][1]["weight"] == 3.0


def test_equal_weights_by_default_and_from_the_command_line(readers, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    a, b = readers
    soup.main(["--out", str(tmp_path), str(a), f"{b}=1"])
    digest = capsys.readouterr().out.strip()
    saved = json.loads((tmp_path / "RECIPE.json").read_text())
    assert saved["weights_sha256"] == digest and saved["command"].startswith("python -m evals.reader.soup --out")
    wa, wb, mixed = (load_file(str(d / "model.safetensors")) for d in (a, b, tmp_path))
    key = next(iter(wa))
    torch.testing.assert_close(mixed[key], (wa[key] + wb[key]) / 2)


def test_ingredients_that_do_not_mean_the_same_thing_are_refused(readers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = readers
    other = tmp_path / "other"
    other.mkdir()
    for item in b.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["added_tokens"] = vocab["added_tokens"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"tokenizer\.json differs"):
        soup.soup([(a, 1.0), (other, 1.0)], tmp_path / "out")
    with pytest.raises(ValueError, match="at least two"):
        soup.soup([(a, 1.0)], tmp_path / "out")
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        soup.soup([(a, 1.0), (tmp_path, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists(), "nothing half-written"
    for bad, message in (("x=0", "positive"), ("x=-1", "positive"), ("x=half", "a number")):
        with pytest.raises(ValueError, match=message):
            soup.parse_ingredient(bad)
    assert soup.parse_ingredient("runs/a=0.3") == (Path("runs/a"), 0.3)
    with pytest.raises(SystemExit):
        soup.main(["--out", str(tmp_path / "cli"), str(a), f"{b}=0"])
