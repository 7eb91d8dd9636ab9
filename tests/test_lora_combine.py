"""LoRA combination by rank concatenation, checked against PEFT running the same adapters on a tiny Llama."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from registry.errors import IncompatibleAdaptersError, InvalidAdapterError, UnsafeFormatError
from registry.lora import (
    MSG_DIFFERENT,
    MSG_WEIGHTS_COUNT,
    LoraWeights,
    Weight,
    combine,
    scaling,
)
from tests.tiny import save_lora, tiny_llama

torch.set_num_threads(2)

CONFIG_A: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
CONFIG_B: dict[str, Any] = {
    "r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"],
}
TOLERANCE = 1e-4
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def weight_for(weight: Weight, module_name: str) -> float:
    if isinstance(weight, int | float):
        return float(weight)
    match = LAYER_RE.search(module_name)
    assert match is not None
    return float(weight[int(match.group(1))])


def peft_reference(adapters: dict[str, tuple[Path, Weight]]) -> torch.Tensor:
    """Logits of PEFT with every adapter active at once, each scaled by its (per-layer) weight.

    Adapter names must not be substrings of "lora_" (PEFT warns and may reinitialise such adapters).
    """
    names = list(adapters)
    model = PeftModel.from_pretrained(tiny_llama(), str(adapters[names[0]][0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name][0]), adapter_name=name)
    model.base_model.set_adapter(names)
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for name, (_, weight) in adapters.items():
                # set_scale keeps PEFT's own alpha/r or alpha/sqrt(r) and multiplies it by the weight.
                module.set_scale(name, weight_for(weight, module_name))
    return logits(model.eval())


def combined_logits(combined: LoraWeights, path: Path) -> torch.Tensor:
    combined.save(path)
    return logits(PeftModel.from_pretrained(tiny_llama(), str(path)).eval())


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max())


def with_config(adapter: LoraWeights, **changes: Any) -> LoraWeights:
    return dataclasses.replace(adapter, config={**adapter.config, **changes})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"a": save_lora(root / "a", seed=1, **CONFIG_A), "b": save_lora(root / "b", seed=2, **CONFIG_B)}


@pytest.fixture(scope="module")
def loras(dirs: dict[str, Path]) -> dict[str, LoraWeights]:
    return {name: LoraWeights.from_dir(path) for name, path in dirs.items()}


def test_saved_keys_follow_peft_naming(loras: dict[str, LoraWeights]) -> None:
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in loras["a"].tensors
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in loras["b"].tensors


def test_combined_logits_equal_peft_with_both_adapters_weighted(
    dirs: dict[str, Path], loras: dict[str, LoraWeights], tmp_path: Path
) -> None:
    reference = peft_reference({"km": (dirs["a"], 0.7), "ke": (dirs["b"], -1.3)})
    got = combined_logits(combine([loras["a"], loras["b"]], [0.7, -1.3]), tmp_path / "ab")
    assert max_diff(reference, logits(tiny_llama())) > 1e-2  # the adapters really change the output
    assert max_diff(got, reference) < TOLERANCE


def test_per_layer_weights_equal_peft_with_per_layer_scales(
    dirs: dict[str, Path], loras: dict[str, LoraWeights], tmp_path: Path
) -> None:
    weights: list[Weight] = [[0.5, 1.5], [2.0, -0.25]]
    reference = peft_reference({"km": (dirs["a"], weights[0]), "ke": (dirs["b"], weights[1])})
    uniform = peft_reference({"km": (dirs["a"], 0.5), "ke": (dirs["b"], 2.0)})
    got = combined_logits(combine([loras["a"], loras["b"]], weights), tmp_path / "per_layer")
    assert max_diff(reference, uniform) > 1e-3
    assert max_diff(got, reference) < TOLERANCE


def test_rslora_scaling_is_alpha_over_sqrt_rank(
    dirs: dict[str, Path], loras: dict[str, LoraWeights], tmp_path: Path
) -> None:
    assert scaling(loras["b"].config) == pytest.approx(16 / math.sqrt(8))
    assert scaling(loras["a"].config) == pytest.approx(8 / 4)
    got = combined_logits(combine([loras["b"]], [1.0]), tmp_path / "rs")
    assert max_diff(got, logits(PeftModel.from_pretrained(tiny_llama(), str(dirs["b"])).eval())) < TOLERANCE


def test_rank_and_alpha_patterns_are_applied_per_module(
    tmp_path: Path, dirs: dict[str, Path], loras: dict[str, LoraWeights]
) -> None:
    patterned = save_lora(
        tmp_path / "p", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.o_proj": 3},
    )
    combined = combine([LoraWeights.from_dir(patterned), loras["a"]], [1.5, 0.5])
    assert combined.config["r"] == 4 + 4  # each adapter's block is as wide as its largest module rank
    expected = peft_reference({"patterned": (patterned, 1.5), "km": (dirs["a"], 0.5)})
    assert max_diff(combined_logits(combined, tmp_path / "pa"), expected) < TOLERANCE


def test_delta_w_is_the_weighted_sum_of_each_lora(loras: dict[str, LoraWeights]) -> None:
    weights = (0.7, -1.3)
    combined = combine([loras["a"], loras["b"]], list(weights))
    scales = (8 / 4, 16 / math.sqrt(8))
    modules = {key.removesuffix(".lora_A.weight") for key in combined.tensors if key.endswith(".lora_A.weight")}
    assert len(modules) == 2 * 5  # union of q, k, v, up, down in both layers
    for module in modules:
        expected = torch.zeros(1)
        for lora, weight, scale in zip((loras["a"], loras["b"]), weights, scales, strict=True):
            if f"{module}.lora_A.weight" in lora.tensors:
                a, b = lora.tensors[f"{module}.lora_A.weight"], lora.tensors[f"{module}.lora_B.weight"]
                expected = expected + weight * scale * (b @ a)
        got = combined.tensors[f"{module}.lora_B.weight"] @ combined.tensors[f"{module}.lora_A.weight"]
        assert torch.allclose(got, expected, atol=1e-5), module


def test_module_in_one_adapter_only_is_padded_with_zeros(loras: dict[str, LoraWeights]) -> None:
    combined = combine([loras["a"], loras["b"]], [1.0, 1.0])
    prefix = "base_model.model.model.layers.0"
    a_k = combined.tensors[f"{prefix}.self_attn.k_proj.lora_A.weight"]
    b_k = combined.tensors[f"{prefix}.self_attn.k_proj.lora_B.weight"]
    assert a_k.shape == (12, 32)
    assert b_k.shape == (16, 12)  # k_proj maps 32 -> 2 kv heads * 8
    assert not a_k[:4].any()  # adapter a's block: a has no k_proj
    assert not b_k[:, :4].any()
    assert torch.equal(a_k[4:], loras["b"].tensors[f"{prefix}.self_attn.k_proj.lora_A.weight"])
    a_v = combined.tensors[f"{prefix}.self_attn.v_proj.lora_A.weight"]
    assert a_v[:4].any()
    assert not a_v[4:].any()


def test_combined_config_has_scaling_one_and_loads_in_peft(loras: dict[str, LoraWeights], tmp_path: Path) -> None:
    combined = combine([loras["a"], loras["b"]], [1.0, 1.0])
    config = combined.config
    assert (config["r"], config["lora_alpha"], config["use_rslora"], scaling(config)) == (12, 12, False, 1.0)
    assert config["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert (config["peft_type"], config["lora_dropout"]) == ("LORA", 0.0)
    combined.save(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "c"))
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert len(layers) == 10
    assert {layer.scaling["default"] for layer in layers} == {1.0}
    assert LoraWeights.from_dir(tmp_path / "c").tensors.keys() == combined.tensors.keys()


def test_output_dtype_defaults_to_first_adapter_and_can_be_chosen(loras: dict[str, LoraWeights]) -> None:
    half = dataclasses.replace(loras["a"], tensors={k: v.to(torch.bfloat16) for k, v in loras["a"].tensors.items()})
    assert {t.dtype for t in combine([half, loras["b"]], [1.0, 1.0]).tensors.values()} == {torch.bfloat16}
    chosen = combine([half, loras["b"]], [1.0, 1.0], dtype=torch.float16)
    assert {t.dtype for t in chosen.tensors.values()} == {torch.float16}


def test_different_base_models_are_refused(loras: dict[str, LoraWeights]) -> None:
    first = with_config(loras["a"], base_model_name_or_path="org/model-x")
    second = with_config(loras["b"], base_model_name_or_path="org/model-y")
    with pytest.raises(IncompatibleAdaptersError) as caught:
        combine([first, second], [1.0, 1.0])
    values = '"org/model-x", "org/model-y"'
    assert caught.value.message.endswith(MSG_DIFFERENT.format(field="base_model_name_or_path", values=values))


@pytest.mark.parametrize("declared", [True, False], ids=["config", "tensors-only"])
def test_dora_is_refused(tmp_path: Path, loras: dict[str, LoraWeights], declared: bool) -> None:
    dora = LoraWeights.from_dir(save_lora(tmp_path / "dora", seed=4, r=4, target_modules=["q_proj"], use_dora=True))
    dora = dora if declared else with_config(dora, use_dora=False)
    with pytest.raises(IncompatibleAdaptersError, match="DoRA"):
        combine([loras["a"], dora], [1.0, 1.0])


def test_embedding_lora_is_refused(tmp_path: Path, loras: dict[str, LoraWeights]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT announces that it also saves the embedding weights
        path = save_lora(tmp_path / "emb", seed=5, r=4, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(IncompatibleAdaptersError, match="embedding LoRA"):
        combine([loras["a"], LoraWeights.from_dir(path)], [1.0, 1.0])


def test_modules_to_save_is_refused(tmp_path: Path, loras: dict[str, LoraWeights]) -> None:
    path = save_lora(tmp_path / "mts", seed=6, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(IncompatibleAdaptersError, match="modules_to_save"):
        combine([LoraWeights.from_dir(path), loras["a"]], [1.0, 1.0])


def test_same_module_with_other_shape_is_refused(tmp_path: Path, loras: dict[str, LoraWeights]) -> None:
    narrow_mlp = tiny_llama(intermediate_size=48)
    wider = save_lora(tmp_path / "wide", seed=7, model=narrow_mlp, r=4, target_modules=["up_proj"])
    with pytest.raises(IncompatibleAdaptersError, match=r"up_proj .* 32 -> 48 .* 32 -> 64"):
        combine([loras["b"], LoraWeights.from_dir(wider)], [1.0, 1.0])


def test_rank_that_contradicts_the_config_is_invalid(loras: dict[str, LoraWeights]) -> None:
    with pytest.raises(InvalidAdapterError, match="rank 4 but its config says 8"):
        combine([with_config(loras["a"], r=8)], [1.0])


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0, [1.0]], "layer 1 but the per-layer weights of adapters"), ([1.0], None)],
    ids=["short-per-layer", "count"],
)
def test_bad_weights_are_refused(loras: dict[str, LoraWeights], weights: Sequence[Weight], match: str | None) -> None:
    if match is None:
        with pytest.raises(ValueError, match=re.escape(MSG_WEIGHTS_COUNT.format(adapters=2, weights=1))):
            combine([loras["a"], loras["b"]], weights)
        return
    with pytest.raises(IncompatibleAdaptersError, match=match):
        combine([loras["a"], loras["b"]], weights)


def test_per_layer_weight_on_module_without_layer_index_is_refused(loras: dict[str, LoraWeights]) -> None:
    head = {
        "base_model.model.lm_head.lora_A.weight": torch.randn(4, 32),
        "base_model.model.lm_head.lora_B.weight": torch.randn(128, 4),
    }
    adapter = LoraWeights(config={**loras["a"].config, "target_modules": ["lm_head"]}, tensors=head)
    with pytest.raises(IncompatibleAdaptersError, match=re.escape("no '.layers.<i>.' index")):
        combine([adapter], [[1.0, 1.0]])
    assert combine([adapter], [2.0]).config["target_modules"] == ["lm_head"]


def test_pickle_only_adapter_is_refused(tmp_path: Path, dirs: dict[str, Path]) -> None:
    (tmp_path / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeFormatError):
        LoraWeights.from_dir(tmp_path)


def test_registry_lora_imports_without_torch() -> None:
    code = "import sys, registry.lora; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
