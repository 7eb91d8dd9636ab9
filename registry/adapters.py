"""Adapter versions: register (version n+1 of a lineage), read, list, delete (refused while aliased)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.errors import AdapterInUseError, NotFoundError
from registry.models import DEFAULT_TENANT, Adapter, AdapterKind, AdapterStatus, Alias, Document
from registry.tenancy import Reach, get_owned, within

if TYPE_CHECKING:
    from registry.store import StoredAdapter

# Two writers registering in one lineage at once collide on (tenant, lineage, version); the loser retries.
REGISTER_ATTEMPTS = 5


def km_lineage(document_id: int) -> str:
    """The lineage (and alias) name of a document's knowledge modules: `km:<document_id>`."""
    return f"km:{document_id}"


@dataclass
class AdapterCreate:
    """A stored adapter blob and what the registry records about it."""

    kind: AdapterKind
    lineage: str
    base_model: str
    rank: int
    alpha: float
    sha256: str
    size_bytes: int
    uri: str
    target_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    document_id: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    writer_versions: dict[str, Any] = field(default_factory=dict)
    status: AdapterStatus = AdapterStatus.READY
    tenant: str = DEFAULT_TENANT
    job_id: int | None = None  # the job that trained it: a retried job registers nothing twice

    @classmethod
    def from_stored(
        cls, stored: StoredAdapter, *, kind: AdapterKind, lineage: str, base_model: str | None = None,
        **fields: Any,
    ) -> AdapterCreate:
        """What to register for an adapter just written to the store (base model from its config by default)."""
        info = stored.info
        base = base_model or info.base_model_name_or_path or "unknown"
        modules = sorted({module.path.rsplit(".", 1)[-1] for module in info.modules})
        return cls(
            kind=kind, lineage=lineage, base_model=base, rank=info.rank, alpha=info.alpha,
            use_rslora=info.use_rslora, sha256=stored.digest, size_bytes=stored.size_bytes, uri=stored.uri,
            target_modules=modules, writer_versions=dict(stored.writer_versions), **fields,
        )


def register_adapter(session: Session, data: AdapterCreate) -> Adapter:
    """Record a new version (latest + 1) of the adapter's lineage and return it.

    Idempotent per job: when `data.job_id` already registered a version of the lineage (a worker died after
    registering, before the job was marked done, and the job ran again), that version is returned instead.
    """
    if data.document_id is not None:
        get_owned(session, Document, data.document_id, data.tenant, "document")
    if data.job_id is not None and (done := registered_by_job(session, data.lineage, data.job_id,
                                                              tenant=data.tenant)) is not None:
        return done
    for attempt in range(REGISTER_ATTEMPTS):
        adapter = _new_version(session, data)
        try:
            with session.begin_nested():
                session.add(adapter)
            return adapter
        except IntegrityError:
            if attempt == REGISTER_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _new_version(session: Session, data: AdapterCreate) -> Adapter:
    version = latest_version(session, data.lineage, tenant=data.tenant) + 1
    return Adapter(
        tenant=data.tenant, kind=data.kind, lineage=data.lineage, version=version, document_id=data.document_id,
        base_model=data.base_model, rank=data.rank, alpha=data.alpha, use_rslora=data.use_rslora,
        target_modules=sorted(data.target_modules), sha256=data.sha256, size_bytes=data.size_bytes, uri=data.uri,
        status=data.status, metrics=dict(data.metrics),
        config={**data.config, **({"job_id": data.job_id} if data.job_id is not None else {})},
        writer_versions=dict(data.writer_versions),
    )


def registered_by_job(session: Session, lineage: str, job_id: int, *, tenant: str = DEFAULT_TENANT) -> Adapter | None:
    """The version of a lineage that job `job_id` registered (recorded as `config["job_id"]`), if any."""
    stmt = select(Adapter).where(Adapter.tenant == tenant, Adapter.lineage == lineage,
                                 Adapter.config["job_id"].as_integer() == job_id)
    return session.scalars(stmt.order_by(Adapter.version.desc())).first()


def latest_version(session: Session, lineage: str, *, tenant: str = DEFAULT_TENANT) -> int:
    """The highest version number in a lineage (0 when it has none)."""
    stmt = select(func.max(Adapter.version)).where(Adapter.tenant == tenant, Adapter.lineage == lineage)
    return session.scalar(stmt) or 0


def get_adapter(session: Session, adapter_id: int, *, tenant: Reach = DEFAULT_TENANT) -> Adapter:
    """An adapter by id; NotFoundError when absent or another tenant's (tenant=None: any tenant)."""
    return get_owned(session, Adapter, adapter_id, tenant, "adapter")


def get_version(session: Session, lineage: str, version: int, *, tenant: str = DEFAULT_TENANT) -> Adapter:
    """One version of a lineage."""
    stmt = select(Adapter).where(Adapter.tenant == tenant, Adapter.lineage == lineage, Adapter.version == version)
    adapter = session.scalars(stmt).one_or_none()
    if adapter is None:
        raise NotFoundError("adapter", f"{lineage} v{version}")
    return adapter


def list_adapters(
    session: Session, *, tenant: Reach = DEFAULT_TENANT, kind: AdapterKind | None = None,
    document_id: int | None = None, lineage: str | None = None, limit: int = 100, offset: int = 0,
) -> tuple[Sequence[Adapter], int]:
    """A page of the tenant's adapters (tenant=None: every tenant's), filtered, newest first, and the total."""
    where = [within(Adapter.tenant, tenant)]
    if kind is not None:
        where.append(Adapter.kind == kind)
    if document_id is not None:
        where.append(Adapter.document_id == document_id)
    if lineage is not None:
        where.append(Adapter.lineage == lineage)
    total = session.scalar(select(func.count()).select_from(Adapter).where(*where)) or 0
    stmt = select(Adapter).where(*where).order_by(Adapter.id.desc()).limit(limit).offset(offset)
    return session.scalars(stmt).all(), total


def update_metrics(
    session: Session, adapter_id: int, metrics: dict[str, Any], *, tenant: Reach = DEFAULT_TENANT
) -> Adapter:
    """Merge keys into an adapter's metrics."""
    adapter = get_adapter(session, adapter_id, tenant=tenant)
    adapter.metrics = {**adapter.metrics, **metrics}
    session.flush()
    return adapter


def delete_adapter(session: Session, adapter_id: int, *, tenant: Reach = DEFAULT_TENANT) -> Adapter:
    """Delete an adapter row; refused with AdapterInUseError while any alias points at it.

    The blob stays until GC finds no row referencing its digest (other versions may share it).
    """
    adapter = get_adapter(session, adapter_id, tenant=tenant)
    aliases = session.scalars(select(Alias.name).where(Alias.adapter_id == adapter.id).order_by(Alias.name)).all()
    if aliases:
        raise AdapterInUseError(adapter.id, list(aliases))
    session.delete(adapter)
    session.flush()
    return adapter


def referenced_digests(session: Session) -> set[str]:
    """Every adapter digest the registry still references (GC keeps these blobs)."""
    return set(session.scalars(select(Adapter.sha256).distinct()).all())


def referenced_uris(session: Session) -> set[str]:
    """Every store URI the registry still references: adapters, uploads, and what jobs derived from documents."""
    uris = set(session.scalars(select(Adapter.uri).distinct()).all())
    for text_uri, artifacts in session.execute(select(Document.text_uri, Document.artifacts)):
        if text_uri:
            uris.add(text_uri)
        uris.update(_strings(artifacts))
    for metrics in session.scalars(select(Adapter.metrics)):
        uris.update(value for key, value in (metrics or {}).items() if key.endswith("_uri") and isinstance(value, str))
    return uris


def _strings(value: Any) -> set[str]:
    """Every string inside a JSON value (artifact records hold URIs at varying depths)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value))
    return set()
