"""OpenAI-compatible request and response shapes (the subset kmserve serves; unknown fields are ignored)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.schemas.common import Seed, Text, Unicode

if TYPE_CHECKING:
    from engines.base import TokenLogprob

MAX_LOGPROBS = 5


class ContentPart(BaseModel):
    """A part of a multi-part message; only text parts are served."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: Unicode | None = None


class ChatMessageIn(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Unicode | list[ContentPart]


class StreamOptions(BaseModel):
    """Streaming options: a final chunk with usage when include_usage is set."""

    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1, max_length=1000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: Unicode | list[Unicode] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> tuple[str, ...]:
        """Stop strings as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionCreate(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionCreate(_SamplingFields):
    """POST /v1/completions; `echo` + `logprobs` + `max_tokens: 0` scores the prompt without generating."""

    prompt: Unicode | list[Unicode]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ModelPublic(BaseModel):
    """One served model: the base model, a document's KM (`km:<id>`), or an alias."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelsPublic(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelPublic]


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(cid: str, created: int, model: str, text: str, finish: str, usage: dict[str, int],
                    extra: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion object."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
              "logprobs": None}
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage, **extra}


def legacy_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object; the first token has no logprob (nothing precedes it).

    `top_logprobs` holds the requested most likely tokens plus the token itself, as OpenAI and vLLM do, and
    `text_offset` is where each token starts in the echoed text.
    """
    top: list[dict[str, float] | None] = []
    for token in tokens:
        if token.logprob is None:
            top.append(None)
            continue
        entries: dict[str, float] = {}
        for text, logprob in (*token.top, (token.text, token.logprob)):
            entries.setdefault(text, logprob)  # two tokens that decode alike keep the likelier one's value
        top.append(entries)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": top, "text_offset": [t.offset for t in tokens]}
