"""Multiple-choice answering through a running server: score each option's tokens, pick the likeliest.

Each option is appended to the same context (the serving reader prompt plus an answer cue) and the whole text is
scored with `POST /v1/completions` (`echo`, `logprobs`, `max_tokens: 0`) on the model being evaluated: the base
model, `km:<document_id>`, or an alias. Only the option's own tokens count: those whose `text_offset` is at or
after the end of the context. The choice is the option with the highest mean token log-probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.prompts import reader_prompt
from evals.metrics import choose_option, length_normalized_scores

if TYPE_CHECKING:
    import openai

ANSWER_CUE = " Answer:"
OPTION_SEPARATOR = " "
MSG_NO_LOGPROBS = "the server returned no logprobs for option {index}; does it serve prompt scoring?"
MSG_CHOICES = "the server returned {got} choices for {expected} options"


@dataclass(frozen=True, slots=True)
class OptionScores:
    """The chosen option and every option's mean token log-probability and token count."""

    index: int
    scores: tuple[float, ...]
    token_counts: tuple[int, ...]


def option_context(question: str, passages: Sequence[str] = ()) -> str:
    """The text every option continues: the reader prompt (with passages, if any) and an answer cue."""
    return reader_prompt(question, passages) + ANSWER_CUE


def option_text(context: str, option: str) -> str:
    """The scored text of one option: the context, a space, the option."""
    return context + OPTION_SEPARATOR + option


def continuation_logprobs(logprobs: Any, start: int) -> list[float]:
    """Log-probabilities of the tokens starting at character `start` or later (an OpenAI `logprobs` object)."""
    return [float(value) for offset, value in zip(logprobs.text_offset, logprobs.token_logprobs, strict=True)
            if offset >= start and value is not None]


def score_options(
    client: openai.OpenAI, model: str, question: str, options: Sequence[str], *, passages: Sequence[str] = ()
) -> OptionScores:
    """Score every option as a continuation of the question on `model` (one request) and pick the best one."""
    context = option_context(question, passages)
    reply = client.completions.create(model=model, prompt=[option_text(context, o) for o in options],
                                      echo=True, logprobs=0, max_tokens=0, temperature=0)
    if len(reply.choices) != len(options):
        raise ValueError(MSG_CHOICES.format(got=len(reply.choices), expected=len(options)))
    per_option = []
    for choice in sorted(reply.choices, key=lambda c: c.index):
        if choice.logprobs is None:
            raise ValueError(MSG_NO_LOGPROBS.format(index=choice.index))
        per_option.append(continuation_logprobs(choice.logprobs, len(context)))
    return OptionScores(index=choose_option(per_option), scores=tuple(length_normalized_scores(per_option)),
                        token_counts=tuple(len(p) for p in per_option))
