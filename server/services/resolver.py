"""Model names -> adapter versions, resolved once at admission (the hot-swap point).

Names: the base model id; `km:<document_id>` (the document's KM alias); `km:<document_id>+ke:<name>`;
`ke:<name>`; or any alias. A KE resolves through alias `ke:<name>` when one exists, else its latest version.
Every name resolves inside the caller's tenant only: another tenant's document, alias or KE reads as missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import adapters as adapter_repo
from registry import aliases as alias_repo
from registry.adapters import km_lineage
from registry.documents import get_document
from registry.errors import ConflictError, NotFoundError, RegistryError
from registry.models import DEFAULT_TENANT, Adapter, AdapterStatus, Alias, Job, JobStatus
from registry.tenancy import owned

KM_RE = re.compile(r"^km:(\d{1,18})$")  # 18 digits: every such id fits a 64-bit column
KE_PREFIX = "ke:"
TRAINING_KINDS = ("ingest", "synthesize", "train_km")
MSG_BAD_NAME = "model {name!r} is not a model, 'km:<document_id>', 'km:<document_id>+ke:<name>' or an alias."
MSG_NO_KM = "document {document_id} has no knowledge module; upload it with training on, or POST /admin/train."
MSG_TRAINING = "the knowledge module of document {document_id} is still being built (job {job_id}); retry when done."


class InvalidModelError(RegistryError):
    """The `model` / `km` string does not name anything kmserve serves."""

    code = "invalid_model"
    status = 400

    def __init__(self, name: str) -> None:
        super().__init__(MSG_BAD_NAME.format(name=name))


class KmNotReadyError(ConflictError):
    """The document exists but its knowledge module is still being trained."""

    code = "km_not_ready"

    def __init__(self, document_id: int, job_id: int) -> None:
        super().__init__(MSG_TRAINING.format(document_id=document_id, job_id=job_id), job_id=job_id)


class NoKmError(NotFoundError):
    """The document exists but has no knowledge module and none is being trained."""

    def __init__(self, document_id: int) -> None:
        RegistryError.__init__(self, MSG_NO_KM.format(document_id=document_id), document_id=document_id)


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version as the query path needs it (a plain value, safe outside the session)."""

    id: int
    kind: str
    lineage: str
    version: int
    uri: str
    key: str
    rank: int
    document_id: int | None
    config: dict[str, object]
    tenant: str = DEFAULT_TENANT

    @classmethod
    def of(cls, adapter: Adapter) -> AdapterRef:
        """The reference of a registry row."""
        key = adapter.uri.rstrip("/").rsplit("/", 1)[-1]
        return cls(adapter.id, adapter.kind.value, adapter.lineage, adapter.version, adapter.uri, key,
                   adapter.rank, adapter.document_id, dict(adapter.config), adapter.tenant)


@dataclass(frozen=True)
class Resolution:
    """What a request will run with: its KM and/or KE (None = the base model)."""

    km: AdapterRef | None = None
    ke: AdapterRef | None = None
    alias: AdapterRef | None = None


def resolve_model(session: Session, name: str, *, tenant: str, base_model_id: str) -> Resolution:
    """Resolve a model name to adapter versions for one request."""
    name = name.strip()
    if name == base_model_id:
        return Resolution()
    km_part, _, ke_part = name.partition("+")
    if ke_part and not ke_part.startswith(KE_PREFIX):
        raise InvalidModelError(name)
    ke = resolve_ke(session, ke_part[len(KE_PREFIX):], tenant=tenant) if ke_part else None
    match = KM_RE.match(km_part)
    if match:
        return Resolution(km=resolve_km(session, int(match.group(1)), tenant=tenant), ke=ke)
    if ke_part:
        raise InvalidModelError(name)
    if km_part.startswith(KE_PREFIX):
        return Resolution(ke=resolve_ke(session, km_part[len(KE_PREFIX):], tenant=tenant))
    return Resolution(alias=_resolve_alias(session, km_part, tenant=tenant))


def resolve_km(session: Session, document_id: int, *, tenant: str) -> AdapterRef:
    """The adapter the document's KM alias points at; 409 while training, 404 when there is none."""
    get_document(session, document_id, tenant=tenant)
    alias = _alias(session, km_lineage(document_id), tenant)
    if alias is not None:
        return AdapterRef.of(owned(alias.adapter, tenant, "document", document_id))
    job_id = _training_job(session, document_id)
    if job_id is not None:
        raise KmNotReadyError(document_id, job_id)
    raise NoKmError(document_id)


def resolve_ke(session: Session, name: str, *, tenant: str) -> AdapterRef:
    """A knowledge extractor by name: its alias when set, else its latest ready version."""
    lineage = KE_PREFIX + name
    alias = _alias(session, lineage, tenant)
    if alias is not None:
        return AdapterRef.of(owned(alias.adapter, tenant, "knowledge extractor", name))
    version = adapter_repo.latest_version(session, lineage, tenant=tenant)
    adapter = adapter_repo.get_version(session, lineage, version, tenant=tenant) if version else None
    if adapter is None or adapter.status != AdapterStatus.READY:
        raise NotFoundError("knowledge extractor", name)
    return AdapterRef.of(adapter)


def _alias(session: Session, name: str, tenant: str) -> Alias | None:
    stmt = select(Alias).where(Alias.tenant == tenant, Alias.name == name)
    return session.scalars(stmt).unique().one_or_none()


def _resolve_alias(session: Session, name: str, *, tenant: str) -> AdapterRef:
    try:
        return AdapterRef.of(alias_repo.resolve_alias(session, name, tenant=tenant))
    except NotFoundError:
        raise InvalidModelError(name) from None


def _training_job(session: Session, document_id: int) -> int | None:
    stmt = (select(Job.id).where(Job.document_id == document_id, Job.kind.in_(TRAINING_KINDS),
                                 Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
            .order_by(Job.id.desc()).limit(1))
    return session.scalar(stmt)
