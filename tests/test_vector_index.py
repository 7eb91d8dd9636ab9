"""The vector index on real Qdrant local mode: upsert, search, delete, idempotence, isolation, layouts, the lock."""

from __future__ import annotations

import math
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import create_autospec

import pytest
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException

from registry.config import Settings
from registry.errors import MSG_INDEX_LOCKED, IndexLockedError, IndexUnavailableError, VectorSizeError
from registry.vector_index import VectorIndex
from registry.vector_layout import (
    CollectionPerDocument,
    IndexChunk,
    SearchTarget,
    SharedCollection,
    point_id,
    stale_filter,
)

DIM = 16


def unit(seed: int, dim: int = DIM) -> list[float]:
    """A random unit vector, the same for the same seed."""
    rng = random.Random(seed)
    vector = [rng.gauss(0, 1) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def chunks_of(document_id: int, count: int, prefix: str = "chunk") -> list[dict[str, object]]:
    return [{"index": i, "text": f"{prefix} {document_id}.{i}", "token_start": 8 * i, "token_end": 8 * i + 8}
            for i in range(count)]


def vectors_of(document_id: int, count: int) -> list[list[float]]:
    return [unit(1000 * document_id + i) for i in range(count)]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def index(settings: Settings) -> Iterator[VectorIndex]:
    with VectorIndex.open(settings) as opened:
        yield opened


def fill(index: VectorIndex, tenant: str, document_id: int, count: int = 4) -> None:
    index.upsert_chunks(tenant, document_id, chunks_of(document_id, count), vectors_of(document_id, count))


def test_upsert_search_delete(index: VectorIndex) -> None:
    assert index.upsert_chunks("t", 1, chunks_of(1, 5), vectors_of(1, 5)) == 5
    hits = index.search("t", [1], unit(1000 + 3), top_k=2)
    assert (hits[0].document_id, hits[0].index, hits[0].text) == (1, 3, "chunk 1.3")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 2 and hits[0].score >= hits[1].score
    index.delete_document("t", 1)
    assert index.search("t", [1], unit(1003), top_k=2) == []
    assert index.point_ids("t", 1) == set()
    index.delete_document("t", 1)  # deleting what is gone is a no-op


def test_reingest_is_idempotent_and_drops_stale_chunks(index: VectorIndex) -> None:
    fill(index, "t", 7, count=6)
    first = index.point_ids("t", 7)
    fill(index, "t", 7, count=6)
    assert index.point_ids("t", 7) == first
    assert first == {point_id("t", 7, IndexChunk.of(c)) for c in chunks_of(7, 6)}
    fill(index, "t", 7, count=3)  # a new chunking: the three chunks that no longer exist go
    assert len(index.point_ids("t", 7)) == 3
    assert index.upsert_chunks("t", 7, [], []) == 0
    assert index.point_ids("t", 7) == set()


def test_documents_and_tenants_are_isolated(index: VectorIndex) -> None:
    fill(index, "t", 1)
    fill(index, "t", 2)
    fill(index, "other", 1)
    query = unit(2000)  # exactly chunk 0 of document 2
    assert {h.document_id for h in index.search("t", [1], query, top_k=10)} == {1}
    assert len(index.search("t", [1], query, top_k=10)) == 4
    assert index.search("t", [2], query, top_k=1)[0].text == "chunk 2.0"
    assert index.search("nobody", [1, 2], query, top_k=5) == []
    index.delete_document("other", 1)
    assert len(index.point_ids("t", 1)) == 4


def test_search_across_documents_merges_best_first(index: VectorIndex) -> None:
    for document_id in (1, 2, 3):
        fill(index, "t", document_id)
    hits = index.search("t", [3, 1, 2, 99], unit(2001), top_k=5)
    assert (hits[0].document_id, hits[0].index) == (2, 1)
    assert len(hits) == 5 and {h.document_id for h in hits} <= {1, 2, 3}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert index.search("t", [], unit(1), top_k=5) == []


def test_vectors_of_another_size_are_refused(index: VectorIndex) -> None:
    fill(index, "t", 1)
    with pytest.raises(VectorSizeError):
        index.upsert_chunks("t", 1, chunks_of(1, 1), [unit(5, dim=DIM + 1)])
    with pytest.raises(ValueError, match="one vector per chunk"):
        index.upsert_chunks("t", 1, chunks_of(1, 2), vectors_of(1, 1))


def test_open_shares_one_index_per_folder_and_the_last_close_releases_it(settings: Settings) -> None:
    first = VectorIndex.open(settings)
    second = VectorIndex.open(settings)
    assert first is second
    first.close()
    fill(second, "t", 1)  # still open for the other user
    second.close()
    with VectorIndex.open(settings) as reopened:
        assert reopened is not first
        assert len(reopened.point_ids("t", 1)) == 4


HOLDER = """
import sys
from qdrant_client import QdrantClient
client = QdrantClient(path=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
client.close()
"""


def test_a_folder_held_by_another_process_raises_index_locked(settings: Settings) -> None:
    folder = settings.qdrant_path
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        with pytest.raises(IndexLockedError) as caught:
            VectorIndex.open(settings)
        assert time.perf_counter() - start < 2.0
        assert caught.value.message == MSG_INDEX_LOCKED.format(path=folder)
        assert caught.value.status == 503
    finally:
        holder.communicate("\n", timeout=30)
    with VectorIndex.open(settings) as index:  # free again once the holder exits
        fill(index, "t", 1)


def test_per_document_collection_names_are_safe_and_unique() -> None:
    layout = CollectionPerDocument()
    names = {layout.collection(tenant, 3) for tenant in ("a.b", "a-b", "A B", "../x", "default")}
    assert len(names) == 5
    assert all(re.fullmatch(r"kms_[a-z0-9-]+_[0-9a-f]{8}_3", name) for name in names)
    assert layout.search_targets("t", [1, 2]) == [SearchTarget(layout.collection("t", 1), None),
                                                   SearchTarget(layout.collection("t", 2), None)]
    assert layout.document_filter("t", 1) is None


def test_shared_collection_filters_by_tenant_and_documents() -> None:
    layout = SharedCollection()
    tenant = models.FieldCondition(key="tenant", match=models.MatchValue(value="t"))
    (target,) = layout.search_targets("t", [4, 9])
    assert target.collection == "kmserve_chunks"
    assert target.query_filter == models.Filter(must=[
        tenant, models.FieldCondition(key="document_id", match=models.MatchAny(any=[4, 9]))])
    one = models.Filter(must=[tenant, models.FieldCondition(key="document_id", match=models.MatchAny(any=[4]))])
    assert layout.document_filter("t", 4) == one
    assert stale_filter(layout, "t", 4, ["id-1"]) == models.Filter(
        must=one.must, must_not=[models.HasIdCondition(has_id=["id-1"])])
    assert dict(layout.payload_indexes) == {"tenant": models.PayloadSchemaType.KEYWORD,
                                            "document_id": models.PayloadSchemaType.INTEGER}


@pytest.mark.filterwarnings("ignore::UserWarning")  # local mode notes that payload indexes do not speed it up
def test_shared_collection_layout_runs_on_a_real_client(tmp_path: Path) -> None:
    index = VectorIndex(QdrantClient(path=str(tmp_path / "q")), SharedCollection(), serialize=True)
    with index:
        fill(index, "t", 1)
        fill(index, "t", 2)
        fill(index, "u", 1)
        assert {h.document_id for h in index.search("t", [1, 2], unit(1000), top_k=8)} == {1, 2}
        assert {h.document_id for h in index.search("u", [1, 2], unit(2000), top_k=8)} == {1}
        fill(index, "t", 1, count=2)
        assert len(index.point_ids("t", 1)) == 2 and len(index.point_ids("u", 1)) == 4
        index.delete_document("t", 1)
        assert index.point_ids("t", 1) == set() and len(index.point_ids("t", 2)) == 4


def test_server_failures_become_index_unavailable() -> None:
    client = create_autospec(QdrantClient, instance=True)
    client.collection_exists.return_value = True
    client.query_points.side_effect = ResponseHandlingException(ConnectionError("connection refused"))
    index = VectorIndex(client, SharedCollection())
    with pytest.raises(IndexUnavailableError) as caught:
        index.search("t", [1], unit(1), top_k=3)
    assert caught.value.code == "vector_index_unavailable"
    assert "connection refused" in caught.value.message


def test_chunks_come_as_mappings_or_objects() -> None:
    chunk = IndexChunk(2, "text", 10, 20)
    assert IndexChunk.of(chunk) == chunk
    assert IndexChunk.of({"index": 2, "text": "text", "token_start": 10, "token_end": 20}) == chunk
    with pytest.raises(ValueError, match="a chunk needs"):
        IndexChunk.of({"index": 2, "text": "text"})
