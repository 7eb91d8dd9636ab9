"""The rerank stage (KARD) and the reasoner's answer: a reranker picks top_k passages from a larger retrieved pool.

The reranker is the tenant's alias `reranker:default` (a LoRA on MiniLM trained by `train_reranker`), or the bundled
MiniLM's cosine similarity when none was trained. Models load on first use and stay cached per process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engines.reasoning import extract_answer
from engines.reranker import RerankerRef, reranker_for
from registry.errors import RegistryError
from server.state import AppState

if TYPE_CHECKING:
    from registry.vector_layout import Passage

MSG_NO_REASONER = "no reasoner is trained here: run a train_reasoner job (alias reasoner:default), or send the query " \
                  "without 'reason'."


class ReasonerUnavailableError(RegistryError):
    """A query asked for the reasoner and none was trained."""

    code = "reasoner_unavailable"
    status = 400

    def __init__(self) -> None:
        super().__init__(MSG_NO_REASONER)


@dataclass
class Reranking:
    """The kept passages (best first), the reranker version (None: plain MiniLM) and the stage's time."""

    passages: list[Passage]
    reranker: RerankerRef | None
    ms: float

    def adapter_public(self) -> dict[str, object] | None:
        """The reranker version as the `adapters` field reports it."""
        ref = self.reranker
        return None if ref is None else {"id": ref.id, "name": ref.lineage, "version": ref.version}


class RerankService:
    """Reranks retrieved passages off the event loop with the tenant's reranker."""

    def __init__(self, state: AppState) -> None:
        self._state = state

    async def rerank(self, tenant: str, question: str, passages: Sequence[Passage], top_k: int) -> Reranking:
        """The `top_k` best passages of the pool by the reranker, best first."""
        start = time.perf_counter()
        kept, ref = await asyncio.to_thread(self._rerank, tenant, question, list(passages), top_k)
        return Reranking(kept, ref, round((time.perf_counter() - start) * 1000, 3))

    def _rerank(self, tenant: str, question: str, passages: list[Passage],
                top_k: int) -> tuple[list[Passage], RerankerRef | None]:
        reranker, ref = reranker_for(self._state.sessions, self._state.store, tenant)
        return reranker.rerank(question, passages, top_k), ref


def reasoned_answer(text: str) -> str:
    """The reasoner's final answer (after 'Answer:' / 'The answer is'), the whole text when it states none."""
    return extract_answer(text) or text.strip()
