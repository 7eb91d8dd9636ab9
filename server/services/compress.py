"""The compress stage of the query pipeline (RECOMP): retrieved passages -> one short text for the prompt.

Extractive: the top-k sentences by the dual encoder (the trained `compressor:extractive` version when its alias exists,
else the plain MiniLM). Abstractive: the `compressor:abstractive` LoRA writes a query-focused summary through the same
engine as the answer; an empty summary means the answer is generated closed-book (selective augmentation).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from engines.base import ChatMessage, GenerationRequest, SamplingParams
from engines.compressor import (
    ABSTRACTIVE_LINEAGE,
    EXTRACTIVE_LINEAGE,
    Encoder,
    abstractive_prompt,
    adapted_embedder,
    extract,
)
from engines.prompts import reader_prompt
from registry.errors import ConflictError
from registry.models import Alias
from server.services.adapters import AdapterService
from server.services.resolver import AdapterRef
from server.state import AppState

if TYPE_CHECKING:
    from registry.vector_layout import Passage

SUMMARY_MAX_TOKENS = 64
MSG_NO_ABSTRACTIVE = (
    "no abstractive compressor is trained yet; train one with POST /admin/train kind "
    "train_compressor_abstractive, or query with compress 'extractive' or 'none'."
)


class CompressorNotTrainedError(ConflictError):
    """compress=abstractive was asked for before any abstractive compressor was trained."""

    code = "compressor_not_trained"

    def __init__(self) -> None:
        super().__init__(MSG_NO_ABSTRACTIVE)


@dataclass(frozen=True)
class Compression:
    """The text that replaces the passages ("" = answer closed-book), the compressor version used, its time, and
    the prompt tokens the uncompressed passages would have cost."""

    text: str
    compressor: AdapterRef | None
    ms: float
    uncompressed_tokens: int


class CompressService:
    """Compresses retrieved passages for one query, extractively or abstractively."""

    def __init__(self, state: AppState, adapters: AdapterService) -> None:
        self._state = state
        self._adapters = adapters

    async def compress(self, tenant: str, method: str, question: str, passages: Sequence[Passage],
                       k: int) -> Compression:
        """The compressed text of the passages (in prompt order) for `question`."""
        start = time.perf_counter()
        texts = [p.text for p in passages]
        if method == "extractive":
            ref = await asyncio.to_thread(self._alias, tenant, EXTRACTIVE_LINEAGE)
            text = await asyncio.to_thread(self._extract, ref, question, texts, k)
        else:
            ref = await asyncio.to_thread(self._alias, tenant, ABSTRACTIVE_LINEAGE)
            if ref is None:
                raise CompressorNotTrainedError()
            text = await self._summarize(ref, question, texts)
        ms = round((time.perf_counter() - start) * 1000, 3)
        return Compression(text, ref, ms, await asyncio.to_thread(self._uncompressed_tokens, question, texts))

    def _uncompressed_tokens(self, question: str, texts: list[str]) -> int:
        # Counted outside the compress timing: it is reporting, not a cost the query pays for compression.
        from engines.hf_loading import encode_request

        request = GenerationRequest(messages=(ChatMessage("user", reader_prompt(question, texts)),))
        return len(encode_request(self._state.require_generator().tokenizer, request))

    def _alias(self, tenant: str, name: str) -> AdapterRef | None:
        stmt = select(Alias).where(Alias.tenant == tenant, Alias.name == name)
        with self._state.sessions() as session:
            alias = session.scalars(stmt).unique().one_or_none()
            return AdapterRef.of(alias.adapter) if alias is not None else None

    def _encoder(self, ref: AdapterRef | None) -> Encoder:
        if ref is None:
            return self._state.require_embedder()
        return adapted_embedder(self._state.settings, ref.id, self._state.store.open(ref.uri))

    def _extract(self, ref: AdapterRef | None, question: str, texts: list[str], k: int) -> str:
        return extract(self._encoder(ref), question, texts, k).text

    async def _summarize(self, ref: AdapterRef, question: str, texts: list[str]) -> str:
        handle = await self._adapters.handle(ref)
        request = GenerationRequest(messages=(ChatMessage("user", abstractive_prompt(question, texts)),),
                                    adapter=handle, sampling=SamplingParams(max_tokens=SUMMARY_MAX_TOKENS))
        (result,) = await self._state.require_generator().generate([request])
        return result.text.strip()
