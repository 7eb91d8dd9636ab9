"""The chunk-vector index for RAG, over Qdrant: upsert a document's chunk vectors, search, delete.

The index takes vectors, never texts (the registry imports no torch; `engines.embedder` makes the vectors).

Deployment:
- Embedded (no KMSERVE_QDRANT_URL): a local folder, `<data dir>/qdrant`. Qdrant's local mode admits ONE client per
  folder (it holds an exclusive lock on `<folder>/.lock` while open, even against a second client in the same
  process), so `VectorIndex.open` hands out one shared, reference-counted index per folder and process. `kmserve up`
  runs the server and the worker in one process (the worker is a thread there), so both use that one index. A
  separate `kmserve worker` process in embedded mode cannot index while the server holds the folder: `open` raises
  `IndexLockedError` at once, and the caller skips or fails indexing with that message.
- Server (KMSERVE_QDRANT_URL, optional KMSERVE_QDRANT_API_KEY): any number of processes share one collection.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from registry.errors import IndexLockedError, IndexUnavailableError, VectorSizeError
from registry.vector_layout import (
    ChunkLike,
    CollectionPerDocument,
    IndexChunk,
    Layout,
    Passage,
    SharedCollection,
    chunk_payload,
    passage_of,
    point_id,
    stale_filter,
)

if TYPE_CHECKING:
    from registry.config import Settings

UPSERT_BATCH = 256
LOCK_FILE = ".lock"
MSG_VECTOR_COUNT = "{chunks} chunks but {vectors} vectors; give one vector per chunk."
# How qdrant-client's local mode says that another client holds the folder.
LOCAL_LOCKED_HINT = "already accessed by another instance"

_shared: dict[str, VectorIndex] = {}
_shared_lock = threading.Lock()


class VectorIndex:
    """A Qdrant client and the layout of documents in it; safe to share between threads."""

    def __init__(self, client: QdrantClient, layout: Layout, *, serialize: bool = False) -> None:
        self._client = client
        self._layout = layout
        # The local-mode client keeps in-memory state and SQLite handles that are not safe to use concurrently.
        self._guard: contextlib.AbstractContextManager[Any] = threading.RLock() if serialize \
            else contextlib.nullcontext()
        # Collections known to exist, and the vector size of those this index wrote to: saves a round trip per call.
        self._present: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._key: str | None = None
        self._users = 1

    @classmethod
    def open(cls, settings: Settings) -> VectorIndex:
        """The process's shared index for these settings (opened on first use); `close()` it when done."""
        key = settings.qdrant_url or str(settings.qdrant_path.resolve())
        with _shared_lock:
            index = _shared.get(key)
            if index is None:
                index = cls.connect(settings)
                index._key, index._users = key, 0
                _shared[key] = index
            index._users += 1
            return index

    @classmethod
    def connect(cls, settings: Settings) -> VectorIndex:
        """A new, unshared index: the Qdrant server when configured, else the local folder."""
        if settings.qdrant_url:
            api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
            return cls(QdrantClient(url=settings.qdrant_url, api_key=api_key), SharedCollection())
        return cls(open_local_client(settings.qdrant_path), CollectionPerDocument(), serialize=True)

    def close(self) -> None:
        """Release this user's reference; the client closes (and a local folder unlocks) with the last one."""
        with _shared_lock:
            self._users -= 1
            if self._users > 0:
                return
            if self._key is not None:
                _shared.pop(self._key, None)
        with self._guard:
            self._client.close()

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def upsert_chunks(self, tenant: str, document_id: int, chunks: Sequence[ChunkLike | Mapping[str, Any]],
                      vectors: Sequence[Sequence[float]]) -> int:
        """Make the document's points exactly these chunks (stale points of an earlier chunking go); returns count."""
        items = [IndexChunk.of(chunk) for chunk in chunks]
        if len(items) != len(vectors):
            raise ValueError(MSG_VECTOR_COUNT.format(chunks=len(items), vectors=len(vectors)))
        if not items:
            self.delete_document(tenant, document_id)
            return 0
        points = _points(tenant, document_id, items, vectors)
        name = self._layout.collection(tenant, document_id)
        with self._operation():
            self._ensure_collection(name, len(vectors[0]))
            for start in range(0, len(points), UPSERT_BATCH):
                self._client.upsert(name, points=points[start:start + UPSERT_BATCH], wait=True)
            stale = stale_filter(self._layout, tenant, document_id, [str(p.id) for p in points])
            self._client.delete(name, points_selector=models.FilterSelector(filter=stale), wait=True)
        return len(points)

    def delete_document(self, tenant: str, document_id: int) -> None:
        """Drop every point of the document (nothing happens when it has none)."""
        name = self._layout.collection(tenant, document_id)
        scope = self._layout.document_filter(tenant, document_id)
        with self._operation():
            if not self._exists(name):
                return
            if scope is None:
                self._client.delete_collection(name)
                self._present.discard(name)
                self._sizes.pop(name, None)
            else:
                self._client.delete(name, points_selector=models.FilterSelector(filter=scope), wait=True)

    def search(self, tenant: str, document_ids: Sequence[int], vector: Sequence[float], top_k: int) -> list[Passage]:
        """The `top_k` chunks most similar to `vector` among the tenant's documents, best first."""
        if top_k < 1 or not document_ids:
            return []
        query = list(map(float, vector))
        hits: list[Passage] = []
        with self._operation():
            for target in self._layout.search_targets(tenant, sorted(set(document_ids))):
                if self._exists(target.collection):
                    response = self._client.query_points(target.collection, query=query, limit=top_k,
                                                         query_filter=target.query_filter, with_payload=True)
                    hits.extend(passage_of(point) for point in response.points)
        # Ties are broken by position so the same query always gives the same order.
        hits.sort(key=lambda p: (-p.score, p.document_id, p.index))
        return hits[:top_k]

    def point_ids(self, tenant: str, document_id: int) -> set[str]:
        """The ids of the document's points."""
        name = self._layout.collection(tenant, document_id)
        scope = self._layout.document_filter(tenant, document_id)
        ids: set[str] = set()
        offset: Any = None
        with self._operation():
            if not self._exists(name):
                return ids
            while True:
                points, offset = self._client.scroll(name, scroll_filter=scope, limit=1024, offset=offset,
                                                     with_payload=False, with_vectors=False)
                ids.update(str(point.id) for point in points)
                if offset is None:
                    return ids

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        """Serialize local-mode calls, and turn Qdrant server failures into `IndexUnavailableError`."""
        with self._guard:
            try:
                yield
            except (UnexpectedResponse, ResponseHandlingException) as exc:
                raise IndexUnavailableError(str(exc).strip() or type(exc).__name__) from exc

    def _exists(self, name: str) -> bool:
        if name not in self._present and self._client.collection_exists(name):
            self._present.add(name)
        return name in self._present

    def _ensure_collection(self, name: str, size: int) -> None:
        known = self._sizes.get(name)
        if known is None and self._exists(name):
            known = _vector_size(self._client.get_collection(name))
        if known is None:
            self._create_collection(name, size)
            known = size
        if known != size:
            raise VectorSizeError(name, known, size)
        self._present.add(name)
        self._sizes[name] = known

    def _create_collection(self, name: str, size: int) -> None:
        try:
            self._client.create_collection(
                name, vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE))
        except UnexpectedResponse as exc:
            if exc.status_code != 409:  # 409: another replica created it first, which is as good
                raise
        for field, schema in self._layout.payload_indexes:
            self._client.create_payload_index(name, field, field_schema=schema, wait=True)


def _points(tenant: str, document_id: int, chunks: Sequence[IndexChunk],
            vectors: Sequence[Sequence[float]]) -> list[models.PointStruct]:
    return [models.PointStruct(id=point_id(tenant, document_id, chunk), vector=list(map(float, vector)),
                               payload=chunk_payload(tenant, document_id, chunk))
            for chunk, vector in zip(chunks, vectors, strict=True)]


def _vector_size(info: models.CollectionInfo) -> int:
    vectors = info.config.params.vectors
    # 0 for named vectors: a collection this index did not create, reported as a size mismatch.
    return vectors.size if isinstance(vectors, models.VectorParams) else 0


@atexit.register
def _close_shared() -> None:
    # Closing before interpreter teardown: qdrant-client's own finalizer fails once modules are torn down.
    with _shared_lock:
        indexes = list(_shared.values())
        _shared.clear()
    for index in indexes:
        with index._guard:
            index._client.close()


def open_local_client(folder: Path) -> QdrantClient:
    """A local-mode client on `folder`; IndexLockedError when another process (or client) holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    # Checked first: qdrant-client takes its lock only after loading every collection, which takes seconds.
    ensure_unlocked(folder)
    try:
        # Threads share this client; VectorIndex serializes the calls, so SQLite's same-thread check is moot.
        return QdrantClient(path=str(folder), force_disable_check_same_thread=True)
    except RuntimeError as exc:
        if LOCAL_LOCKED_HINT in str(exc):
            raise IndexLockedError(folder) from exc
        raise


def ensure_unlocked(folder: Path) -> None:
    """Raise IndexLockedError when a Qdrant local client elsewhere holds the folder's lock."""
    import portalocker  # qdrant-client's own lock library, so both take the same kind of lock

    lock_path = folder / LOCK_FILE
    if not lock_path.exists():
        return
    with lock_path.open("r+") as handle:
        try:
            portalocker.lock(handle, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
        except portalocker.exceptions.LockException as exc:
            raise IndexLockedError(folder) from exc
        portalocker.unlock(handle)
