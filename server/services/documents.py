"""Documents: store an upload and queue its training chain in one transaction; read, list and delete them."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import documents as document_repo
from registry.adapters import km_lineage
from registry.db import transaction, write_transaction
from registry.errors import JobStateError
from registry.models import Alias, Document, DocumentStatus, Job, JobStatus
from registry.queue import JobSpec
from registry.tenancy import Reach
from server.limits import JobQuota, training_jobs
from server.schemas.documents import (
    DocumentDetailPublic,
    DocumentPublic,
    DocumentsPublic,
    DocumentUploadPublic,
    KmPublic,
    TrainOptions,
)
from server.schemas.jobs import JobPublic
from server.services.document_files import CheckedDocument, DocumentUpload, check_document, check_train
from server.state import AppState

log = logging.getLogger(__name__)

# The jobs each training method needs after ingest (which extracts, chunks and indexes the text for RAG).
CHAINS: dict[str, tuple[str, ...]] = {
    "none": ("ingest",),
    "lm": ("ingest", "train_km"),
    "ddcd": ("ingest", "train_km"),
    "sdcd": ("ingest", "synthesize", "train_km"),
}
LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)

# Called with (tenant, document_id) after a document is deleted, e.g. to drop its vectors from the index.
DeleteHook = Callable[[str, int], None]


class DocumentService:
    """Uploads, reads and deletes of documents within a caller's reach (another tenant's are 404)."""

    def __init__(self, state: AppState, *, on_delete: Sequence[DeleteHook] = ()) -> None:
        self._state = state
        self._on_delete = tuple(on_delete)
        self._quota = JobQuota.from_settings(state.settings)

    @property
    def max_upload_bytes(self) -> int:
        """The size limit of an upload."""
        return self._state.settings.max_upload_bytes

    def create(self, upload: DocumentUpload, tenant: str) -> DocumentUploadPublic:
        """Store the upload and queue its jobs; the same content again returns the existing document."""
        checked = check_document(upload, self.max_upload_bytes)
        check_train(upload.train, self._state.max_adapter_rank)
        adding = training_jobs(CHAINS[upload.train.method])
        # A refusal comes before the blob is written; the writing transaction checks again, and decides.
        with transaction(self._state.sessions) as session:
            self._ensure_room(session, tenant, hashlib.sha256(checked.data).hexdigest(), adding)
        # Written before the row that names it: a crash in between leaves an orphan blob, which GC removes.
        blob = self._state.store.put_blob(checked.data, checked.suffix)
        with write_transaction(self._state.sessions) as session:
            self._ensure_room(session, tenant, blob.digest, adding)
            data = _document_create(checked, upload, blob.digest, blob.uri, tenant)
            document, created = document_repo.create_document(session, data)
            if created:
                jobs = self._queue_chain(session, document, upload.train, blob.uri)
            else:
                jobs = _jobs_of(session, document.id)
            detail = _detail(session, document, jobs)
        return DocumentUploadPublic(**detail.model_dump(), created=created)

    def revise(self, document_id: int, upload: DocumentUpload, tenant: Reach) -> DocumentUploadPublic:
        """New content for an existing document: its jobs run again and its KM gets the next version.

        Unchanged content returns the document as it is. The current KM keeps serving until the new one is
        trained and verified; unfinished jobs of the old revision are cancelled first.
        """
        checked = check_document(upload, self.max_upload_bytes)
        check_train(upload.train, self._state.max_adapter_rank)
        blob = self._state.store.put_blob(checked.data, checked.suffix)
        with transaction(self._state.sessions) as session:
            current = document_repo.get_document(session, document_id, tenant=tenant)
            owner = current.tenant
            live = [] if current.content_hash == blob.digest else [
                job for job in _jobs_of(session, document_id) if job.status in LIVE]
            if current.content_hash != blob.digest:
                # Checked before the old revision's jobs are cancelled, counting those as gone.
                self._quota.ensure_room(session, owner, training_jobs(CHAINS[upload.train.method]),
                                        freed=training_jobs([j.kind for j in live if not j.cancel_requested]))
        self._cancel([job.id for job in live])
        with write_transaction(self._state.sessions) as session:
            data = _document_create(checked, upload, blob.digest, blob.uri, owner)
            document, changed = document_repo.revise_document(session, document_id, data)
            if changed:
                # Refused here, the revision rolls back with the rest of the transaction.
                self._quota.ensure_room(session, owner, training_jobs(CHAINS[upload.train.method]))
                self._queue_chain(session, document, upload.train, blob.uri)
            detail = _detail(session, document, _jobs_of(session, document.id))
        return DocumentUploadPublic(**detail.model_dump(), created=False)

    def list_documents(self, tenant: Reach, *, status: DocumentStatus | None, limit: int, offset: int
                       ) -> DocumentsPublic:
        """A page of the tenant's documents (None: every tenant's), newest first."""
        with transaction(self._state.sessions) as session:
            documents, total = document_repo.list_documents(
                session, tenant=tenant, status=status, limit=limit, offset=offset
            )
            kms = _kms(session, documents)
            data = [_public(d, kms.get(d.id)) for d in documents]
        return DocumentsPublic(data=data, count=total)

    def get(self, document_id: int, tenant: Reach) -> DocumentDetailPublic:
        """One document with its jobs and current KM version."""
        with transaction(self._state.sessions) as session:
            document = document_repo.get_document(session, document_id, tenant=tenant)
            return _detail(session, document, _jobs_of(session, document.id))

    def delete(self, document_id: int, tenant: Reach) -> None:
        """Cancel the document's unfinished jobs, then delete it with its KMs and their aliases."""
        with transaction(self._state.sessions) as session:
            owner = document_repo.get_document(session, document_id, tenant=tenant).tenant
            live = [job.id for job in _jobs_of(session, document_id) if job.status in LIVE]
        self._cancel(live)
        with write_transaction(self._state.sessions) as session:
            removed = document_repo.delete_document(session, document_id, tenant=owner)
        log.info("deleted document %s and %d adapter(s)", document_id, len(removed))
        for hook in self._on_delete:
            hook(owner, document_id)

    def _ensure_room(self, session: Session, tenant: str, digest: str, adding: int) -> None:
        """JobQuotaExceededError when new content would queue more training than the tenant's quota allows."""
        if document_repo.find_by_hash(session, digest, tenant=tenant) is None:
            self._quota.ensure_room(session, tenant, adding)

    def _queue_chain(self, session: Session, document: Document, train: TrainOptions, blob_uri: str) -> list[Job]:
        payload: dict[str, Any] = {
            "blob_uri": blob_uri, "media_type": document.media_type, "train": train.model_dump(),
        }
        specs = [JobSpec(kind, dict(payload), tenant=document.tenant, document_id=document.id)
                 for kind in CHAINS[train.method]]
        return self._state.queue.add_chain(session, specs)

    def _cancel(self, job_ids: Iterable[int]) -> None:
        # Last first: a queued dependent is cancelled on its own rather than left waiting on a running job.
        for job_id in sorted(job_ids, reverse=True):
            with suppress(JobStateError):  # it ended meanwhile
                self._state.queue.cancel(job_id)


def _document_create(
    checked: CheckedDocument, upload: DocumentUpload, digest: str, uri: str, tenant: str
) -> document_repo.DocumentCreate:
    # text_uri names the uploaded bytes (so GC keeps them); ingest replaces it with extracted text for PDFs.
    return document_repo.DocumentCreate(
        title=checked.title, content_hash=digest, size_bytes=len(checked.data), text_uri=uri,
        source_name=checked.source_name, media_type=checked.media_type, metadata=dict(upload.metadata),
        tenant=tenant,
    )


def _jobs_of(session: Session, document_id: int) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.document_id == document_id).order_by(Job.id)))


def _kms(session: Session, documents: Sequence[Document]) -> dict[int, KmPublic]:
    """The KM version each document's `km:<id>` alias (in the document's tenant) points at."""
    if not documents:
        return {}
    names = {(d.tenant, km_lineage(d.id)): d.id for d in documents}
    stmt = select(Alias).where(Alias.tenant.in_({tenant for tenant, _ in names}),
                               Alias.name.in_({name for _, name in names}))
    return {names[(a.tenant, a.name)]: KmPublic(adapter_id=a.adapter_id, version=a.adapter.version)
            for a in session.scalars(stmt).unique() if (a.tenant, a.name) in names}


def _public(document: Document, km: KmPublic | None) -> DocumentPublic:
    return DocumentPublic(
        id=document.id, tenant=document.tenant, title=document.title, status=document.status,
        content_hash=document.content_hash, size_bytes=document.size_bytes, media_type=document.media_type,
        source_name=document.source_name, token_count=document.token_count, metadata=dict(document.metadata_),
        revision=document.revision, created_at=document.created_at, km=km,
    )


def _detail(session: Session, document: Document, jobs: list[Job]) -> DocumentDetailPublic:
    public = _public(document, _kms(session, [document]).get(document.id))
    return DocumentDetailPublic(**public.model_dump(), jobs=[JobPublic.model_validate(job) for job in jobs])
