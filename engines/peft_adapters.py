"""The base model plus the PEFT LoRA adapters resident in it, and the mixed-adapter forward pass.

Everything here mutates or runs the model, so the transformers engine calls it from ONE worker thread only:
loads, unloads and decoding steps are serialised there and never interleave inside a forward pass.

What PEFT's mixed-batch inference does and needs (peft 0.21, `adapter_names=[...]` forwarded by
`PeftModelForCausalLM.forward` to forward pre-hooks on every LoRA layer, see `LoraModel._enable_peft_forward_hooks`):
- every row names its adapter; "__base__" means no LoRA for that row. Names are checked against the loaded adapters
  on every call (a typo raises), and the model must be in eval mode (training mode refuses `adapter_names`).
- Without `adapter_names` PeftModel applies its *active* adapter (the first one loaded) to every row, so base rows
  must be sent as "__base__" explicitly once a PeftModel exists.
- `LoraLayer._mixed_batch_forward` runs the base layer on the whole batch, then one LoRA matmul per distinct
  adapter over that adapter's rows; cost grows with the number of distinct adapters in the batch, not the rows.
- the hooks are installed per call, so the KV cache of earlier steps stays valid and each decode step just
  passes the same names again.
- PEFT needs a first adapter to create the PeftModel (`PeftModel.from_pretrained`); before that the plain base
  model serves. Deleting the last adapter would leave empty LoRA wrappers in every layer, so the last delete
  unwraps back to the plain model with `unload()`.
- `load_adapter(torch_device=None)` infers a device on its own (CUDA if present) even when the model is on the
  CPU, so the model's device is passed explicitly.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.base import AdapterHandle
from engines.errors import AdapterLoadError
from registry.errors import RegistryError, UnsafeFormatError
from registry.lora import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

BASE_ADAPTER = "__base__"


def adapter_name(adapter_id: int) -> str:
    """The PEFT adapter name of a registry adapter id (PEFT names must not contain dots)."""
    return f"adapter_{adapter_id}"


def check_adapter_dir(handle: AdapterHandle) -> None:
    """Refuse anything but a PEFT directory with a config and safetensors weights (pickle is never loaded)."""
    path = handle.path
    if not path.is_dir() or not (path / CONFIG_FILE).is_file():
        raise AdapterLoadError(handle.id, path, f"not a PEFT adapter directory (no {CONFIG_FILE})")
    if not (path / WEIGHTS_FILE).is_file():
        if (path / PICKLE_WEIGHTS_FILE).exists():
            raise UnsafeFormatError(PICKLE_WEIGHTS_FILE)
        raise AdapterLoadError(handle.id, path, f"{WEIGHTS_FILE} is missing")


class PeftAdapterSet:
    """A base model that becomes a PeftModel on the first adapter load and goes back after the last unload."""

    def __init__(self, model: PreTrainedModel) -> None:
        self._base: Any = model
        self._peft: Any = None
        self.device: torch.device = model.device

    @property
    def model(self) -> Any:
        """The module that runs: the PeftModel while adapters are loaded, else the plain base model."""
        return self._peft if self._peft is not None else self._base

    @property
    def names(self) -> tuple[str, ...]:
        """PEFT names of the loaded adapters."""
        return tuple(self._peft.peft_config) if self._peft is not None else ()

    def load(self, handle: AdapterHandle) -> None:
        """Load a verified PEFT directory as adapter `adapter_name(handle.id)`; errors become AdapterLoadError."""
        check_adapter_dir(handle)
        name = adapter_name(handle.id)
        try:
            self._load(Path(handle.path), name)
        except RegistryError:
            raise
        except Exception as exc:  # PEFT raises ValueError/KeyError/RuntimeError for bad configs and shapes
            self._forget(name)
            if self._peft is None:
                _strip_tuner_layers(self._base)
            raise AdapterLoadError(handle.id, handle.path, f"{type(exc).__name__}: {exc}") from exc

    def _load(self, path: Path, name: str) -> None:
        from peft import PeftModel

        device = str(self.device)
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(
                self._base, str(path), adapter_name=name, is_trainable=False, torch_device=device
            )
        else:
            self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False, torch_device=device)
        self._peft.eval()

    def unload(self, adapter_id: int) -> None:
        """Delete an adapter's LoRA modules and free their memory."""
        self._forget(adapter_name(adapter_id))
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _forget(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            return
        remaining = [n for n in self._peft.peft_config if n != name]
        if not remaining:
            # unload() drops every LoRA wrapper at once; deleting first would leave empty wrappers behind.
            self._base = self._peft.unload()
            self._peft = None
            return
        if name == self._peft.active_adapter:
            # Moving the (unused) active adapter first keeps PEFT from warning that it deleted the active one.
            self._peft.set_adapter(remaining[0], inference_mode=True)
        self._peft.delete_adapter(name)

    def forward_last(self, batch: dict[str, Any], adapter_names: list[str]) -> torch.Tensor:
        """Logits at the last position of every row; each row runs with its own adapter (or the base)."""
        return self.forward_logits(batch, adapter_names, logits_to_keep=1, use_cache=True)[:, -1, :]

    def forward_logits(
        self, batch: dict[str, Any], adapter_names: list[str], *, logits_to_keep: int = 0, use_cache: bool = False
    ) -> torch.Tensor:
        """Logits of the last `logits_to_keep` positions (0: all) of every row, each row with its own adapter."""
        import torch

        with torch.inference_mode():
            if self._peft is None:
                out = self._base(**batch, use_cache=use_cache, logits_to_keep=logits_to_keep)
            else:
                out = self._peft(**batch, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                 adapter_names=adapter_names)
        return out.logits

    def lora_tensor_names(self) -> list[str]:
        """Names of every LoRA tensor in the running model's state dict (to check unloads free memory)."""
        return [k for k in self.model.state_dict() if "lora_" in k]


def _strip_tuner_layers(model: Any) -> None:
    """Put back the original layers where a failed first load had already injected LoRA wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
