"""Prompt scoring shared by the engines: prompt ids with character offsets, and per-token log-probabilities.

The prompt is encoded exactly as generation encodes it (`add_special_tokens=True`, so a BOS token comes first),
with the tokenizer's offset mapping: each token's offset is where its text starts in the prompt, which is what lets
a caller score only the tokens of a continuation (those at or after the continuation's first character). The
transformers engine computes the log-probabilities with `prompt_logprobs` (one forward pass of the whole prompt);
the vLLM engine takes them from vLLM and only uses the tokenization and `score_result` from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from engines.base import ScoreRequest, ScoreResult, TokenLogprob
from engines.errors import InvalidRequestError
from engines.hf_loading import MSG_EMPTY_PROMPT

if TYPE_CHECKING:
    import torch

MSG_NO_OFFSETS = "scoring needs a fast tokenizer (one that reports character offsets); this model's is not"
# Positions per log_softmax: bounds the float32 copy of the logits to CHUNK x vocabulary at a time.
CHUNK = 512
TopTokens = list[tuple[int, float]]
LogitsFn = Callable[[dict[str, Any], list[str]], "torch.Tensor"]


def encode_with_offsets(tokenizer: Any, prompt: str) -> tuple[list[int], list[int]]:
    """The prompt's token ids (as generation encodes it) and each token's start offset in the prompt."""
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidRequestError(MSG_NO_OFFSETS)
    encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    if not ids:
        raise InvalidRequestError(MSG_EMPTY_PROMPT)
    offsets: list[int] = []
    for start, _ in encoded["offset_mapping"]:
        # Special tokens report (0, 0); keeping offsets non-decreasing keeps "tokens from offset k on" a suffix.
        offsets.append(max(int(start), offsets[-1] if offsets else 0))
    return ids, offsets


def prompt_logprobs(
    forward: LogitsFn, ids: Sequence[int], adapter_name: str, top_k: int, device: torch.device
) -> tuple[list[float | None], list[TopTokens]]:
    """Log-probability of each token given the ones before it (None for the first) and the top_k per position."""
    import torch

    with torch.inference_mode():
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        logits = forward({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, [adapter_name])[0]
        targets = input_ids[0, 1:]
        chosen: list[float | None] = [None]
        tops: list[TopTokens] = [[]]
        for start in range(0, len(ids) - 1, CHUNK):
            end = min(start + CHUNK, len(ids) - 1)
            # logits[t] is the distribution of token t + 1 (the last position predicts nothing in the prompt).
            lp = logits[start:end].float().log_softmax(dim=-1)
            chosen += lp.gather(-1, targets[start:end, None])[:, 0].tolist()
            tops += _top(lp, top_k)
    return chosen, tops


def _top(logprobs: torch.Tensor, k: int) -> list[TopTokens]:
    if k == 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, indices = logprobs.topk(k, dim=-1)
    return [list(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(indices.tolist(), values.tolist(), strict=True)]


def score_result(
    tokenizer: Any, request: ScoreRequest, ids: Sequence[int], offsets: Sequence[int],
    logprobs: Sequence[float | None], tops: Sequence[TopTokens],
) -> ScoreResult:
    """The engine-neutral result: each token with its text (special tokens spelled out) and offset."""
    texts = _decode_each(tokenizer, ids)
    top_ids = sorted({token for row in tops for token, _ in row})
    top_text = dict(zip(top_ids, _decode_each(tokenizer, top_ids), strict=True))
    tokens = tuple(
        TokenLogprob(token_id=int(token), text=text, offset=offset, logprob=logprob,
                     top=tuple((top_text[t], float(v)) for t, v in top))
        for token, text, offset, logprob, top in zip(ids, texts, offsets, logprobs, tops, strict=True)
    )
    return ScoreResult(request.request_id, tokens, request.adapter_id)


def _decode_each(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if not ids:
        return []  # batch_decode([]) decodes one empty sequence
    return [str(t) for t in tokenizer.batch_decode(
        [[int(i)] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)]
