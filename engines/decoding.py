"""Per-row decoding pieces of the transformers engine: incremental detokenization with stop strings, and sampling.

Detokenization follows the prefix/read-offset scheme (as vLLM does): decode a short window of recent tokens and
emit only what the newest token added, holding back text that ends in an incomplete UTF-8 sequence ("\\ufffd") or
that could still grow into a stop string. The concatenation of emitted deltas is therefore the final text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from engines.base import SamplingParams

if TYPE_CHECKING:
    import torch

Decode = Callable[[list[int]], str]
REPLACEMENT_CHAR = "\ufffd"
_seed_source = random.SystemRandom()


class RowText:
    """The text of one row, fed token by token; `push` returns (newly safe delta, stop string hit)."""

    def __init__(self, decode: Decode, stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._tokens: list[int] = []
        self._prefix_offset = self._read_offset = 0
        self._text = ""
        self._emitted = 0

    def push(self, token_id: int, *, check_stop: bool = True) -> tuple[str, bool]:
        """Add one generated token; return the text that is now safe to emit and whether a stop string matched."""
        self._tokens.append(token_id)
        self._text += self._new_text()
        if check_stop:
            cut = self._find_stop()
            if cut is not None:
                self._text = self._text[:cut]
                return self._emit(cut), True
        return self._emit(len(self._text) - self._held_back()), False

    def flush(self) -> str:
        """The remaining text at the end of the row (held-back text and any incomplete character)."""
        tail = self._decode(self._tokens[self._prefix_offset:])
        head = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        if len(tail) > len(head):
            self._text += tail[len(head):]
            self._prefix_offset = self._read_offset = len(self._tokens)
        return self._emit(len(self._text))

    def _new_text(self) -> str:
        head = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        tail = self._decode(self._tokens[self._prefix_offset:])
        # Wait for more tokens while the window ends inside a multi-byte character (or decodes to nothing new).
        if len(tail) <= len(head) or tail.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return tail[len(head):]

    def _find_stop(self) -> int | None:
        # Text before `_emitted` was checked when it was emitted, and a stop string cannot start there because
        # held-back text always covers the longest suffix that could begin one.
        hits = [i for s in self._stop if (i := self._text.find(s, self._emitted)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        delta, self._emitted = self._text[self._emitted:end], end
        return delta


def row_generator(sampling: SamplingParams) -> torch.Generator:
    """A CPU generator for one row: seeded from the request's seed, or from the OS when none is given."""
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(sampling.seed if sampling.seed is not None else _seed_source.getrandbits(63))
    return generator


def sample_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a row's logits with temperature and nucleus (top_p) filtering."""
    import torch

    if sampling.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the first token always survives.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
