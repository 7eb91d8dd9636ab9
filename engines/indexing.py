"""Indexing for RAG: embed a document's retrieval chunks and make them its points in the vector index.

The ingest job calls `index_document` with the chunks it cut; it runs wherever the worker runs. In embedded mode
the index folder admits one process, so a separate worker process gets `IndexLockedError` while the server holds it
(see `registry.vector_index`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from engines.embedder import shared_embedder
from registry.vector_index import VectorIndex
from registry.vector_layout import ChunkLike, IndexChunk

if TYPE_CHECKING:
    from registry.config import Settings


def index_document(settings: Settings, tenant: str, document_id: int,
                   retrieval_chunks: Sequence[ChunkLike | Mapping[str, Any]]) -> int:
    """Embed the chunks and replace the document's points with them; returns how many were indexed."""
    chunks = [IndexChunk.of(chunk) for chunk in retrieval_chunks]
    # Opened before embedding: a locked embedded folder fails at once instead of after the model's work.
    with VectorIndex.open(settings) as index:
        vectors = shared_embedder(settings).embed([chunk.text for chunk in chunks])
        return index.upsert_chunks(tenant, document_id, chunks, vectors)
