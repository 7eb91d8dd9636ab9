"""One batch of rows decoded together: a left-padded prefill, then one forward pass per step for all live rows.

Why a hand-written loop and not `model.generate(adapter_names=...)`: generate applies one sampling setting and one
stopping rule to the whole batch and streams through a single streamer, while serving needs per-row temperature,
top_p and seed, per-row max_tokens / stop strings / EOS, a text stream per row, and finished or cancelled rows
dropped from the batch (their KV-cache rows too) so they stop costing compute. The loop is short because the
model does the hard parts; what it must get right for a row to decode exactly as it would alone:
- left padding with an attention mask that hides the pads from every query, and
- position ids counted per row from its first real token (cumsum of the mask - 1), continued +1 per step.
Everything here runs on the engine's single worker thread; only `cancel` is called from the event loop.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engines.base import FinishReason, SamplingParams
from engines.decoding import Decode, RowText, row_generator, sample_token

if TYPE_CHECKING:
    import torch

ForwardFn = Callable[[dict[str, Any], list[str]], "torch.Tensor"]


@functools.cache
def cache_keyword() -> str:
    """The forward() keyword of the KV cache: recent transformers call it `cache` (`past_key_values` still works
    there, with a warning, until 5.40); earlier 5.x releases know only `past_key_values`."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@dataclass(frozen=True, slots=True)
class RowSpec:
    """What one row of a batch decodes: its prompt ids, PEFT adapter name and sampling parameters."""

    prompt_ids: list[int]
    adapter_name: str
    sampling: SamplingParams


@dataclass(frozen=True, slots=True)
class RowEvent:
    """Output of one row for one step: a text delta, and the finish reason on its last step."""

    row: int
    delta: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0


@dataclass
class _Row:
    spec: RowSpec
    text: RowText
    generator: torch.Generator
    generated: int = 0
    done: bool = False
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)


def left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask with every prompt right-aligned (pads on the left)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class BatchDecoder:
    """Decodes a fixed set of rows step by step with a shared KV cache; rows leave as they finish."""

    def __init__(
        self,
        rows: Sequence[RowSpec],
        forward: ForwardFn,
        decode: Decode,
        *,
        pad_id: int,
        eos_ids: frozenset[int],
        device: torch.device,
    ) -> None:
        self._rows = [_Row(s, RowText(decode, s.sampling.stop), row_generator(s.sampling)) for s in rows]
        self._forward_fn, self._pad_id, self._eos_ids, self._device = forward, pad_id, eos_ids, device
        self._live: list[int] = list(range(len(rows)))
        self._last: list[int] = []
        self._state: dict[str, Any] = {}
        self.forward_calls = 0

    @property
    def done(self) -> bool:
        """True when no row is left to decode."""
        return not self._live

    def cancel(self, row: int) -> None:
        """Stop decoding a row at the next step (its client went away)."""
        self._rows[row].cancelled = True

    def prefill(self) -> list[RowEvent]:
        """Run every prompt through the model at once and pick each row's first token."""
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            ids, mask = left_pad([r.spec.prompt_ids for r in self._rows], self._pad_id, self._device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = self._forward({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                    cache_keyword(): cache})
            self._state = {"mask": mask, "next_pos": positions[:, -1] + 1, "cache": cache}
            return self._advance(logits)

    def step(self) -> list[RowEvent]:
        """Feed each live row its last token and pick the next one."""
        import torch

        with torch.inference_mode():
            self._compact()
            if not self._live:
                return []
            state = self._state
            ids = torch.tensor(self._last, dtype=torch.long, device=self._device)[:, None]
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((len(self._live), 1))], dim=1)
            logits = self._forward({"input_ids": ids, "attention_mask": state["mask"],
                                    "position_ids": state["next_pos"][:, None], cache_keyword(): state["cache"]})
            state["next_pos"] = state["next_pos"] + 1
            return self._advance(logits)

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        self.forward_calls += 1
        return self._forward_fn(batch, [self._rows[i].spec.adapter_name for i in self._live])

    def _advance(self, logits: torch.Tensor) -> list[RowEvent]:
        self._last = self._choose(logits)
        events = [self._consume(i, token) for i, token in zip(self._live, self._last, strict=True)]
        self._compact()
        return events

    def _choose(self, logits: torch.Tensor) -> list[int]:
        logits = logits.float().clone()  # masked in place below; never write into the model's output
        eos = sorted(self._eos_ids)
        for k, i in enumerate(self._live):
            row = self._rows[i]
            if eos and row.generated < row.spec.sampling.min_tokens:
                logits[k, eos] = float("-inf")  # min_tokens: EOS may not end the row yet
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        for k, i in enumerate(self._live):
            row = self._rows[i]
            if not row.spec.sampling.greedy:
                tokens[k] = sample_token(logits[k], row.spec.sampling, row.generator)
        return tokens

    def _consume(self, i: int, token: int) -> RowEvent:
        row = self._rows[i]
        row.generated += 1
        row.tokens.append(token)
        sampling = row.spec.sampling
        if token in self._eos_ids and not sampling.ignore_eos:
            return self._finish(i, row.text.flush(), "stop")
        delta, hit_stop = row.text.push(token, check_stop=row.generated >= sampling.min_tokens)
        if hit_stop:
            return self._finish(i, delta, "stop")
        if row.generated >= sampling.max_tokens:
            return self._finish(i, delta + row.text.flush(), "length")
        return RowEvent(i, delta)

    def _finish(self, i: int, delta: str, reason: FinishReason) -> RowEvent:
        row = self._rows[i]
        row.done = True
        return RowEvent(i, delta, reason, row.generated)

    def _compact(self) -> None:
        import torch

        keep = [k for k, i in enumerate(self._live) if not (self._rows[i].done or self._rows[i].cancelled)]
        if len(keep) == len(self._live):
            return
        self._live = [self._live[k] for k in keep]
        self._last = [self._last[k] for k in keep]
        if not keep or not self._state:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        self._state["cache"].batch_select_indices(index)
        self._state["mask"] = self._state["mask"][index]
        self._state["next_pos"] = self._state["next_pos"][index]

    def generated_tokens(self, row: int) -> list[int]:
        """Token ids generated so far by a row (for tests and debugging)."""
        return list(self._rows[row].tokens)
