"""Loading a causal LM and its tokenizer for the transformers engine, and turning requests into token ids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engines.base import GenerationRequest
from engines.errors import EngineUnavailableError, InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MSG_NO_CHAT_TEMPLATE = "the model's tokenizer has no chat template; send prompt text instead of messages"
MSG_EMPTY_PROMPT = "the prompt encodes to zero tokens"
_DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` = the first CUDA device when there is one, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineUnavailableError("hf", f"device {device!r} was requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 on CPU (CPU half precision is slow and imprecise)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InvalidRequestError(f"dtype must be auto or one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; reuse its parsing instead of reading the environment.
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_causal_lm(model_id_or_path: str, device: str = "auto", dtype: str = "auto") -> PreTrainedModel:
    """Load a causal LM (HF id or local dir) in eval mode; no network when HF_HUB_OFFLINE is set."""
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_id_or_path, dtype=resolve_dtype(dtype, target), local_files_only=_offline(),
        )
    except OSError as exc:  # missing files, or no network with the model not cached
        raise EngineUnavailableError("hf", f"cannot load model {model_id_or_path!r}: {exc}") from exc
    return model.to(target).eval()


def load_tokenizer(model_id_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer that goes with `load_causal_lm`; left padding is what batched decoding needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, local_files_only=_offline())
    tokenizer.padding_side = "left"
    return tokenizer


def encode_request(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest) -> list[int]:
    """Token ids of a request: prompt text with the tokenizer's special tokens, or the chat template."""
    if request.messages is not None:
        ids = _encode_chat(tokenizer, [{"role": m.role, "content": m.content} for m in request.messages])
    else:
        ids = list(tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise InvalidRequestError(MSG_EMPTY_PROMPT)
    return [int(i) for i in ids]


def _encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(MSG_NO_CHAT_TEMPLATE)
    # sanitize_control_tokens: "<|assistant|>" typed by a user stays text instead of becoming a control token.
    encoded: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True,
    )
    return list(encoded["input_ids"])


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's EOS plus the generation config's (which may be a list)."""
    ids: set[int] = set()
    candidates: list[Any] = [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def context_limit(model: PreTrainedModel) -> int:
    """The model's context window in tokens (max_position_embeddings, or a generous default)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 4096)
