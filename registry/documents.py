"""Documents: create (deduplicated by content hash per tenant), read, list, update status, delete."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.errors import DuplicateError
from registry.models import DEFAULT_TENANT, Adapter, Alias, Document, DocumentStatus
from registry.tenancy import Reach, get_owned, within


def content_hash(text: str) -> str:
    """The SHA-256 of a document's text (UTF-8); the key that deduplicates uploads."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class DocumentCreate:
    """What is known of a document when it is uploaded."""

    title: str
    content_hash: str
    size_bytes: int
    text_uri: str | None = None
    source_name: str | None = None
    media_type: str = "text/plain"
    metadata: dict[str, Any] = field(default_factory=dict)
    tenant: str = DEFAULT_TENANT


def create_document(session: Session, data: DocumentCreate) -> tuple[Document, bool]:
    """Insert a document, or return the tenant's existing one with the same content; the flag says if it is new."""
    existing = find_by_hash(session, data.content_hash, tenant=data.tenant)
    if existing is not None:
        return existing, False
    document = Document(
        tenant=data.tenant, title=data.title, content_hash=data.content_hash, size_bytes=data.size_bytes,
        text_uri=data.text_uri, source_name=data.source_name, media_type=data.media_type,
        metadata_=dict(data.metadata),
    )
    try:
        with session.begin_nested():
            session.add(document)
    except IntegrityError:
        # A concurrent upload of the same content won the insert: theirs is the document.
        winner = find_by_hash(session, data.content_hash, tenant=data.tenant)
        if winner is None:
            raise
        return winner, False
    return document, True


def find_by_hash(session: Session, digest: str, *, tenant: str = DEFAULT_TENANT) -> Document | None:
    """The tenant's document with this content hash, if any."""
    stmt = select(Document).where(Document.tenant == tenant, Document.content_hash == digest)
    return session.scalars(stmt).one_or_none()


def get_document(session: Session, document_id: int, *, tenant: Reach = DEFAULT_TENANT) -> Document:
    """A document by id; NotFoundError when absent or another tenant's (tenant=None: any tenant)."""
    return get_owned(session, Document, document_id, tenant, "document")


def list_documents(
    session: Session, *, tenant: Reach = DEFAULT_TENANT, status: DocumentStatus | None = None,
    limit: int = 100, offset: int = 0,
) -> tuple[Sequence[Document], int]:
    """A page of the tenant's documents (tenant=None: every tenant's), newest first, and the total count."""
    where = [within(Document.tenant, tenant)]
    if status is not None:
        where.append(Document.status == status)
    total = session.scalar(select(func.count()).select_from(Document).where(*where)) or 0
    stmt = select(Document).where(*where).order_by(Document.id.desc()).limit(limit).offset(offset)
    return session.scalars(stmt).all(), total


def update_document(
    session: Session, document_id: int, *, tenant: Reach = DEFAULT_TENANT,
    status: DocumentStatus | None = None, token_count: int | None = None, text_uri: str | None = None,
) -> Document:
    """Set the fields given (status, token count, text location) and return the document."""
    document = get_document(session, document_id, tenant=tenant)
    if status is not None:
        document.status = status
    if token_count is not None:
        document.token_count = token_count
    if text_uri is not None:
        document.text_uri = text_uri
    session.flush()
    return document


def revise_document(session: Session, document_id: int, data: DocumentCreate) -> tuple[Document, bool]:
    """Give a document new content (a new revision); the flag is False when the content did not change.

    Derived artifacts are dropped (they describe the old text); the KM lineage stays, so the next training
    registers the next version and the current one keeps serving until then. DuplicateError when another of the
    tenant's documents already has this content.
    """
    document = get_document(session, document_id, tenant=data.tenant)
    if document.content_hash == data.content_hash:
        return document, False
    other = find_by_hash(session, data.content_hash, tenant=data.tenant)
    if other is not None:
        raise DuplicateError("document with this content", other.id)
    document.content_hash, document.size_bytes, document.text_uri = data.content_hash, data.size_bytes, data.text_uri
    document.media_type, document.source_name = data.media_type, data.source_name
    document.title = data.title or document.title
    if data.metadata:
        document.metadata_ = dict(data.metadata)
    document.artifacts, document.token_count, document.status = {}, None, DocumentStatus.PENDING
    document.revision += 1
    session.flush()
    return document, True


def delete_document(session: Session, document_id: int, *, tenant: Reach = DEFAULT_TENANT) -> list[Adapter]:
    """Delete a document with its adapters and the aliases pointing at them; return the removed adapters.

    Their blobs stay in the store until GC finds them unreferenced, so a crash between the two loses nothing.
    """
    document = get_document(session, document_id, tenant=tenant)
    adapters = list(session.scalars(select(Adapter).where(Adapter.document_id == document.id)).all())
    adapter_ids = [a.id for a in adapters]
    if adapter_ids:
        for alias in session.scalars(select(Alias).where(Alias.adapter_id.in_(adapter_ids))).all():
            session.delete(alias)
        session.flush()
        for adapter in adapters:
            session.delete(adapter)
    session.delete(document)
    session.flush()
    return adapters
