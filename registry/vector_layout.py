"""Where chunk vectors live in Qdrant, and the values that cross the index: chunks in, passages out.

Two layouts, chosen by deployment mode:
- `CollectionPerDocument` (embedded local folder): local mode filters by scanning every payload in Python
  (~100 ms at 10k points), so each document gets its own small collection and a search never filters.
- `SharedCollection` (Qdrant server): one collection for everything, filtered by keyword/integer payload indexes on
  tenant and document_id, which the server resolves without scanning.
Point ids are uuid5 of (tenant, document, chunk index, chunk text hash): re-indexing the same chunks rewrites the
same points instead of adding copies.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qdrant_client import models

TENANT_KEY = "tenant"
DOCUMENT_KEY = "document_id"
SHARED_COLLECTION = "kmserve_chunks"
DOCUMENT_PREFIX = "kms"
# Fixed forever: changing it changes every point id and breaks idempotent re-indexing of existing data.
POINT_NAMESPACE = uuid.UUID("6f1f3c2e-8a4b-5d6e-9f70-1a2b3c4d5e6f")
MAX_SLUG = 32
CHUNK_FIELDS = ("index", "text", "token_start", "token_end")
MSG_CHUNK_FIELDS = "a chunk needs index, text, token_start and token_end; got {got!r}"


class ChunkLike(Protocol):
    """Anything shaped like a retrieval chunk (the ingest job's `Chunk` is one)."""

    @property
    def index(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def token_start(self) -> int: ...

    @property
    def token_end(self) -> int: ...


@dataclass(frozen=True, slots=True)
class IndexChunk:
    """A retrieval chunk of a document: its position, text and token span [token_start, token_end)."""

    index: int
    text: str
    token_start: int
    token_end: int

    @classmethod
    def of(cls, chunk: ChunkLike | Mapping[str, Any]) -> IndexChunk:
        """The chunk from a mapping ({index, text, token_start, token_end}) or any object with those attributes."""
        if isinstance(chunk, Mapping):
            values = [chunk.get(name) for name in CHUNK_FIELDS]
        else:
            values = [getattr(chunk, name, None) for name in CHUNK_FIELDS]
        index, text, start, end = values
        if index is None or text is None or start is None or end is None:
            raise ValueError(MSG_CHUNK_FIELDS.format(got=chunk))
        return cls(int(index), str(text), int(start), int(end))


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrieved chunk and its cosine similarity to the query."""

    document_id: int
    index: int
    text: str
    score: float


def point_id(tenant: str, document_id: int, chunk: IndexChunk) -> str:
    """The deterministic point id of a chunk."""
    digest = hashlib.sha256(chunk.text.encode("utf-8")).hexdigest()
    return str(uuid.uuid5(POINT_NAMESPACE, f"{tenant}\x1f{document_id}\x1f{chunk.index}\x1f{digest}"))


def chunk_payload(tenant: str, document_id: int, chunk: IndexChunk) -> dict[str, Any]:
    """What a point stores next to its vector."""
    return {TENANT_KEY: tenant, DOCUMENT_KEY: document_id, "index": chunk.index, "text": chunk.text,
            "token_start": chunk.token_start, "token_end": chunk.token_end}


def passage_of(point: models.ScoredPoint) -> Passage:
    """The passage a search hit stands for."""
    payload = point.payload or {}
    return Passage(int(payload[DOCUMENT_KEY]), int(payload["index"]), str(payload["text"]), float(point.score))


@dataclass(frozen=True, slots=True)
class SearchTarget:
    """One collection to search, with the filter that restricts it to the requested documents (None: no filter)."""

    collection: str
    query_filter: models.Filter | None


class Layout(Protocol):
    """How documents map to collections and filters."""

    @property
    def payload_indexes(self) -> tuple[tuple[str, models.PayloadSchemaType], ...]:
        """(field, schema) pairs to index in a collection when it is created."""
        ...

    def collection(self, tenant: str, document_id: int) -> str:
        """The collection that holds the document's points."""
        ...

    def document_filter(self, tenant: str, document_id: int) -> models.Filter | None:
        """The filter selecting the document's points in its collection; None when the collection is the document."""
        ...

    def search_targets(self, tenant: str, document_ids: Sequence[int]) -> list[SearchTarget]:
        """The searches that together cover the documents."""
        ...


def stale_filter(layout: Layout, tenant: str, document_id: int, keep: Sequence[str]) -> models.Filter:
    """The document's points other than `keep` (left over from an earlier, different chunking)."""
    scope = layout.document_filter(tenant, document_id)
    return models.Filter(must=scope.must if scope else None, must_not=[models.HasIdCondition(has_id=list(keep))])


@dataclass(frozen=True)
class CollectionPerDocument:
    """Embedded local mode: one collection per (tenant, document), searched without filters."""

    prefix: str = DOCUMENT_PREFIX
    payload_indexes: tuple[tuple[str, models.PayloadSchemaType], ...] = ()

    def collection(self, tenant: str, document_id: int) -> str:
        """`<prefix>_<tenant slug>_<tenant hash>_<document id>`: a safe folder name, unique per tenant."""
        slug = re.sub(r"[^a-z0-9]+", "-", tenant.lower()).strip("-")[:MAX_SLUG] or "t"
        # The hash keeps tenants apart whose slugs collide ("a.b" and "a-b").
        digest = hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:8]
        return f"{self.prefix}_{slug}_{digest}_{document_id}"

    def document_filter(self, tenant: str, document_id: int) -> models.Filter | None:
        """None: the whole collection is the document."""
        return None

    def search_targets(self, tenant: str, document_ids: Sequence[int]) -> list[SearchTarget]:
        """One unfiltered search per document."""
        return [SearchTarget(self.collection(tenant, d), None) for d in document_ids]


@dataclass(frozen=True)
class SharedCollection:
    """Qdrant server: one collection, filtered by indexed tenant and document_id payloads."""

    name: str = SHARED_COLLECTION
    payload_indexes: tuple[tuple[str, models.PayloadSchemaType], ...] = (
        (TENANT_KEY, models.PayloadSchemaType.KEYWORD), (DOCUMENT_KEY, models.PayloadSchemaType.INTEGER),
    )

    def collection(self, tenant: str, document_id: int) -> str:
        """The shared collection."""
        return self.name

    def document_filter(self, tenant: str, document_id: int) -> models.Filter | None:
        """Tenant and document must both match."""
        return self.documents_filter(tenant, [document_id])

    def documents_filter(self, tenant: str, document_ids: Sequence[int]) -> models.Filter:
        """The tenant's points of any of the documents."""
        return models.Filter(must=[
            models.FieldCondition(key=TENANT_KEY, match=models.MatchValue(value=tenant)),
            models.FieldCondition(key=DOCUMENT_KEY, match=models.MatchAny(any=list(document_ids))),
        ])

    def search_targets(self, tenant: str, document_ids: Sequence[int]) -> list[SearchTarget]:
        """One filtered search over the shared collection."""
        return [SearchTarget(self.name, self.documents_filter(tenant, document_ids))]
