"""What jobs derive from a document and where it is recorded: blobs in the store, their URIs in `Document.artifacts`.

`Document.artifacts` holds `text` (normalized text), `chunks` (the chunk set below) and `synthetic`, a map from a
synthetic-data key to `{uri, profile, model, prompt_version, counts, created_at}`, the entry used last listed last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from registry.db import transaction, write_transaction
from registry.documents import get_document
from registry.errors import NotFoundError
from registry.models import Document, DocumentStatus, utcnow
from registry.store import AdapterStore
from registry.store_format import writer_versions
from trainer_worker.context import JobContext, PermanentJobError

log = logging.getLogger(__name__)

CHUNKS_FORMAT = 1
MSG_NO_DOCUMENT_ID = "this {kind} job names no document; it needs the document_id of an upload."
MSG_DOCUMENT_GONE = "document {document_id} no longer exists (deleted?); there is nothing to {kind}."
MSG_CHUNKS_FORMAT = "chunk set {uri} has format {found}, this worker reads format {expected}; re-run ingest."


@dataclass(frozen=True)
class Chunk:
    """A span of a document's normalized text: tokens [token_start, token_end) of the base model's tokenizer."""

    index: int
    text: str
    token_start: int
    token_end: int

    @property
    def tokens(self) -> int:
        """How many tokens the chunk spans."""
        return self.token_end - self.token_start


@dataclass(frozen=True)
class ChunkSet:
    """A document cut for training (long chunks, overlapping) and for retrieval (short chunks)."""

    train_chunks: list[Chunk]
    retrieval_chunks: list[Chunk]
    tokenizer: str
    chunk_tokens: int
    overlap: float
    retrieval_tokens: int
    retrieval_overlap: float = 0.0
    writer_versions: dict[str, str] = field(default_factory=writer_versions)

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in the blob store."""
        return {"format": CHUNKS_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], uri: str = "") -> ChunkSet:
        """Read a stored chunk set back; unknown keys (from a newer writer) are ignored with a warning."""
        if data.get("format") != CHUNKS_FORMAT:
            raise PermanentJobError(MSG_CHUNKS_FORMAT.format(uri=uri, found=data.get("format"),
                                                             expected=CHUNKS_FORMAT))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            log.warning("chunk set %s has keys this worker does not know, ignored: %s", uri, ", ".join(unknown))
        values = {key: data[key] for key in known if key in data}
        for key in ("train_chunks", "retrieval_chunks"):
            values[key] = [Chunk(**chunk) for chunk in values[key]]
        return cls(**values)


def put_json(store: AdapterStore, value: Any, suffix: str = ".json") -> str:
    """Store a JSON value as a blob and return its URI."""
    data = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return store.put_blob(data, suffix).uri


def read_chunks(store: AdapterStore, uri: str) -> ChunkSet:
    """The chunk set stored at `uri` (checksum-verified by the store)."""
    return ChunkSet.from_json(json.loads(store.get_blob(uri)), uri)


def load_document(ctx: JobContext) -> Document:
    """The job's document; PermanentJobError when the job names none or it was deleted."""
    document_id = _document_id(ctx)
    try:
        with transaction(ctx.sessions) as session:
            return get_document(session, document_id, tenant=ctx.job.tenant)
    except NotFoundError as exc:
        raise PermanentJobError(MSG_DOCUMENT_GONE.format(document_id=document_id, kind=ctx.job.kind)) from exc


def _document_id(ctx: JobContext) -> int:
    if ctx.job.document_id is None:
        raise PermanentJobError(MSG_NO_DOCUMENT_ID.format(kind=ctx.job.kind))
    return ctx.job.document_id


def _locked_document(session: Session, ctx: JobContext) -> Document:
    document_id = _document_id(ctx)
    document = session.get(Document, document_id, with_for_update=True)
    if document is None or document.tenant != ctx.job.tenant:
        raise PermanentJobError(MSG_DOCUMENT_GONE.format(document_id=document_id, kind=ctx.job.kind))
    return document


def update_document(
    ctx: JobContext, artifacts: Mapping[str, Any] | None = None, *, status: DocumentStatus | None = None,
    token_count: int | None = None, keep_status: tuple[DocumentStatus, ...] = (),
) -> Document:
    """Merge `artifacts` into the document's and set status / token count, under the row's lock."""
    with write_transaction(ctx.sessions) as session:
        document = _locked_document(session, ctx)
        if artifacts:
            # A new dict: the JSON column only notices assignment, not mutation in place.
            document.artifacts = {**document.artifacts, **artifacts}
        if status is not None and document.status not in keep_status:
            document.status = status
        if token_count is not None:
            document.token_count = token_count
        session.flush()
        return document


def synthetic_key(chunks_uri: str, model: str, profile: str, prompt_version: int, checked: bool = False) -> str:
    """The key of synthetic data: what it was generated from, by which model, profile and prompts, and whether its
    QA answers were checked (data generated without the check keeps the key it had)."""
    parts: list[Any] = [chunks_uri, model, profile, prompt_version, *(["checked"] if checked else [])]
    material = json.dumps(parts, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def record_synthetic(ctx: JobContext, key: str, entry: Mapping[str, Any]) -> Document:
    """Record synthetic data under `key` as the document's latest entry (moved to the end, stamped now)."""
    with write_transaction(ctx.sessions) as session:
        document = _locked_document(session, ctx)
        synthetic = {k: v for k, v in document.artifacts.get("synthetic", {}).items() if k != key}
        synthetic[key] = {**entry, "used_at": utcnow().isoformat()}
        document.artifacts = {**document.artifacts, "synthetic": synthetic}
        session.flush()
        return document


def latest_synthetic(artifacts: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The synthetic-data entry used last (key, entry), or None when there is none."""
    synthetic: dict[str, dict[str, Any]] = artifacts.get("synthetic") or {}
    if not synthetic:
        return None
    key = max(synthetic, key=lambda k: str(synthetic[k].get("used_at", "")))
    return key, synthetic[key]
