"""The retrieve stage of the query pipeline: embed the question, search the tenant's documents in the vector index.

The index and the embedder are opened on first use (a server that never serves RAG never loads them). Passages come
back best first; later stages (a reranker, a compressor) take and return that same list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select

from registry.db import transaction
from registry.errors import NotFoundError, VectorIndexError
from registry.models import Document
from server.state import AppState

if TYPE_CHECKING:
    from engines.embedder import Embedder
    from registry.vector_index import VectorIndex
    from registry.vector_layout import Passage

log = logging.getLogger(__name__)


class Retriever:
    """Question -> the most similar chunks of the given documents."""

    def __init__(self, index: VectorIndex, embedder: Embedder) -> None:
        self._index = index
        self._embedder = embedder

    def retrieve(self, tenant: str, document_ids: Sequence[int], question: str, top_k: int) -> list[Passage]:
        """The `top_k` passages most similar to the question, best first."""
        (vector,) = self._embedder.embed([question])
        return self._index.search(tenant, document_ids, vector, top_k)


class RetrievalService:
    """Retrieval for the app: checks the tenant owns the documents, then searches off the event loop."""

    def __init__(self, state: AppState) -> None:
        self._state = state

    async def retrieve(self, tenant: str, document_ids: Sequence[int], question: str, top_k: int) -> list[Passage]:
        """Passages of the tenant's documents, best first; NotFoundError for a document that is not the tenant's."""
        return await asyncio.to_thread(self._retrieve, tenant, list(document_ids), question, top_k)

    def _retrieve(self, tenant: str, document_ids: list[int], question: str, top_k: int) -> list[Passage]:
        self._check_owned(tenant, document_ids)
        retriever = Retriever(self._state.require_vector_index(), self._state.require_embedder())
        return retriever.retrieve(tenant, document_ids, question, top_k)

    def _check_owned(self, tenant: str, document_ids: list[int]) -> None:
        stmt = select(Document.id).where(Document.tenant == tenant, Document.id.in_(document_ids))
        with transaction(self._state.sessions) as session:
            owned = set(session.scalars(stmt))
        for document_id in document_ids:
            if document_id not in owned:
                raise NotFoundError("document", document_id)

    def forget_document(self, tenant: str, document_id: int) -> None:
        """Drop a deleted document's vectors (a document-delete hook); failures are logged, never raised."""
        try:
            self._state.require_vector_index().delete_document(tenant, document_id)
        except VectorIndexError as exc:
            # The document row is already gone, so failing the delete now would help no one. Left-over vectors are
            # unreachable (retrieval checks ownership) unless SQLite reuses the id, and indexing that new document
            # replaces them.
            log.warning("vectors of document %s were not dropped: %s", document_id, exc.message)
