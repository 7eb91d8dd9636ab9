"""A knowledge extractor in training: a trainable KE LoRA and frozen knowledge modules on one base, mixed per layer.

Every LoRA layer in decoder layer l adds w_M[l] * s_M * B_M A_M x + w_E[l] * s_E * B_E A_E x to its base output, where
s is each adapter's own scaling and w_M, w_E are learnable per-layer scalars. `registry.lora.combine([km, ke],
[w_M, w_E])` builds exactly this sum as one adapter, so serving the combination runs the model that was trained.

PEFT multiplies an adapter's delta by `layer.scaling[adapter]` in forward. A forward pre-hook on every LoRA layer sets
that entry to w[l] * s (a tensor of the learnable weights) before each call, which is how the weights get gradients.
They learn at `mix_lr_scale` times the KE's learning rate (`KeTrainer.param_groups`).
The KE is PEFT's `default` adapter, so the helpers that read a trained LoRA (`adapter_tensors`, `peft_config_dict`)
read the KE. Only one KM is active at a time: the one of the document the current examples are about.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_worker.dcd import collate_side
from trainer_worker.km_data import chat_prefix, encode

if TYPE_CHECKING:
    import torch

KE_ADAPTER = "default"
WEIGHTS_MODULE = "layer_weights"
WEIGHT_NAMES = ("km", "ke")
INIT_WEIGHT = 0.5
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")

MSG_NO_LAYER = "LoRA module {name} has no '.layers.<i>.' index, so it cannot have per-layer weights"
MSG_KM_FIT = "the knowledge module of document {document_id} does not fit the base model: {detail}"
MSG_EXTRA_MODULE = "{adapter} puts a LoRA on {name}, which the knowledge extractor does not cover"
MSG_NOT_LOADED = "no knowledge module of document {document_id} is loaded"
MSG_NO_OPTIONS = "score_options needs at least one option, each with at least one token"


def km_adapter_name(document_id: int) -> str:
    """The PEFT adapter name of a document's knowledge module inside the KE model."""
    return f"km_{document_id}"


def lora_layers(model: Any) -> dict[str, tuple[int, Any]]:
    """Every LoRA layer of the model by module name, with its decoder layer index."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            match = _LAYER_RE.search(name)
            if match is None:
                raise ValueError(MSG_NO_LAYER.format(name=name))
            found[name] = (int(match.group(1)), module)
    return found


class KeModel:
    """A PeftModel whose `default` adapter is the KE, with frozen KMs switched in per document, mixed per layer."""

    def __init__(self, model: Any, init: float = INIT_WEIGHT) -> None:
        import torch

        self.model = model
        layers = lora_layers(model)
        count = max(getattr(model.config, "num_hidden_layers", 0) or 0, 1 + max(i for i, _ in layers.values()))
        device = next(model.parameters()).device
        self.weights = torch.nn.ParameterDict(
            {key: torch.nn.Parameter(torch.full((count,), float(init), device=device)) for key in WEIGHT_NAMES})
        # A submodule of the PeftModel: the trainer's optimizer, gradient clipping and checkpoints include it.
        model.add_module(WEIGHTS_MODULE, self.weights)
        self._base: dict[str, dict[str, float]] = {name: {} for name in layers}
        self._km_params: dict[int, list[Any]] = {}
        self._active: int | None = None
        self._capture(KE_ADAPTER)
        self._hooks = [module.register_forward_pre_hook(self._hook(name, index))
                       for name, (index, module) in layers.items()]

    def _capture(self, adapter: str) -> None:
        # The adapter's own scaling (alpha/r) per module, read before any hook replaced it with a tensor.
        for name, (_, module) in lora_layers(self.model).items():
            if adapter in module.scaling:
                if name not in self._base:
                    raise ValueError(MSG_EXTRA_MODULE.format(adapter=adapter, name=name))
                self._base[name][adapter] = float(module.scaling[adapter])

    def _hook(self, name: str, index: int) -> Any:
        base = self._base[name]

        def set_scaling(module: Any, args: Any) -> None:
            for adapter in module.active_adapters:
                if adapter in base:
                    weight = self.weights["ke" if adapter == KE_ADAPTER else "km"][index]
                    module.scaling[adapter] = weight * base[adapter]

        return set_scaling

    def load_km(self, document_id: int, path: Path) -> None:
        """Load a document's KM (a verified PEFT adapter folder) frozen, without dropout."""
        import torch

        adapter = km_adapter_name(document_id)
        device = next(self.model.parameters()).device
        try:
            result = self.model.load_adapter(str(path), adapter_name=adapter, is_trainable=False,
                                             torch_device=str(device))
            self._capture(adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ValueError(MSG_KM_FIT.format(document_id=document_id, detail=exc)) from exc
        if result.unexpected_keys:
            raise ValueError(MSG_KM_FIT.format(document_id=document_id, detail=result.unexpected_keys[:3]))
        for _, module in lora_layers(self.model).values():
            if adapter in module.lora_dropout:
                # A frozen KM is applied as it will be served: dropout would only add noise to the KE's signal.
                module.lora_dropout[adapter] = torch.nn.Identity()
        marker = f".{adapter}."
        self._km_params[document_id] = [p for n, p in self.model.named_parameters() if marker in n]

    def activate(self, document_id: int) -> None:
        """Make the document's KM and the KE the active adapters; the KM stays frozen."""
        if document_id not in self._km_params:
            raise KeyError(MSG_NOT_LOADED.format(document_id=document_id))
        if self._active == document_id:
            return
        self.model.base_model.set_adapter([km_adapter_name(document_id), KE_ADAPTER])
        # set_adapter marks every active adapter trainable; the KM must not be.
        for param in self._km_params[document_id]:
            param.requires_grad_(False)
        self._active = document_id

    def layer_weights(self) -> dict[str, list[float]]:
        """The per-layer weights as the KE's registry config records them: {"km": [w_M...], "ke": [w_E...]}."""
        return {key: [float(w) for w in self.weights[key].detach().cpu()] for key in WEIGHT_NAMES}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-layer weights as tensors named `layer_weights.<km|ke>`, copied to the CPU."""
        return {f"{WEIGHTS_MODULE}.{key}": self.weights[key].detach().to("cpu", copy=True) for key in WEIGHT_NAMES}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the per-layer weights from tensors named as `tensors()` names them."""
        import torch

        with torch.no_grad():
            for key in WEIGHT_NAMES:
                self.weights[key].copy_(tensors[f"{WEIGHTS_MODULE}.{key}"])

    def close(self) -> None:
        """Remove the hooks and give every adapter its plain float scaling back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, (_, module) in lora_layers(self.model).items():
            module.scaling.update(self._base.get(name, {}))


@contextmanager
def ke_model(model: Any, init: float = INIT_WEIGHT) -> Iterator[KeModel]:
    """A KeModel on a PeftModel whose `default` adapter is the KE; hooks removed afterwards."""
    ke = KeModel(model, init)
    try:
        yield ke
    finally:
        ke.close()


def split_weights(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Split a KE snapshot into the KE's LoRA tensors and its per-layer weights."""
    prefix = WEIGHTS_MODULE + "."
    lora = {name: t for name, t in tensors.items() if not name.startswith(prefix)}
    weights = {key: [float(w) for w in tensors[prefix + key]] for key in WEIGHT_NAMES}
    return lora, weights


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, else EOS, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def score_options(model: Any, tokenizer: Any, prompt: str, options: Sequence[str]) -> list[float]:
    """Mean log-probability of each option's tokens after `prompt` (one chat user turn): length-normalised scores."""
    import torch

    prefix = chat_prefix(tokenizer, prompt)
    targets = [encode(tokenizer, option) for option in options]
    if not targets or not all(targets):
        raise ValueError(MSG_NO_OPTIONS)
    device = next(model.parameters()).device
    side = collate_side([prefix + t for t in targets], [len(t) for t in targets], pad_token_id(tokenizer), device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=side.input_ids, attention_mask=side.attention_mask, position_ids=side.position_ids,
                        use_cache=False, logits_to_keep=side.keep + 1)
    finally:
        model.train(was_training)
    # The logit before each target token predicts it: drop the last position, as lm_loss does.
    log_probs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    labels = side.input_ids[:, -side.keep:]
    mask = side.target_mask[:, -side.keep:].float()
    token_lp = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    return [float(s) for s in token_lp.sum(-1) / mask.sum(-1)]
