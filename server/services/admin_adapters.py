"""Admin work on adapters: list, inspect, upload (checked against the base model first), delete, engine residency."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from engines.base import EngineStats
from engines.errors import AdapterNotLoadedError, EngineOverloadedError
from engines.factory import resolve_base_model
from engines.model_shapes import base_module_shapes, check_adapter_fits
from registry import adapters as adapter_repo
from registry.adapter_files import AdapterInfo, inspect_adapter_dir
from registry.aliases import set_alias
from registry.db import transaction, write_transaction
from registry.documents import get_document
from registry.errors import ConflictError
from registry.models import Adapter, AdapterKind, AdapterStatus, Alias
from registry.store import StoredAdapter
from registry.tenancy import Reach, within
from server.metrics import ServerMetrics
from server.schemas.adapters import AdapterPublic, AdaptersPublic, EngineAdapterPublic, EnginePublic
from server.services.adapter_uploads import UploadPart, UploadTarget, stage_upload
from server.services.adapters import AdapterService
from server.services.resolver import AdapterRef
from server.state import AppState

log = logging.getLogger(__name__)
# Uploads are staged under the data dir (next to the store, not in a small /tmp) and removed when done.
UPLOADS_DIRNAME = "uploads"

MSG_NOT_READY = "adapter {adapter_id} is {status}; only ready adapters can be loaded."
MSG_LINEAGE_TAKEN = (
    "lineage {lineage!r} holds {kind} adapters of document {document_id}; a {new_kind} adapter of document "
    "{new_document_id} cannot join it. Pick another lineage."
)


class AdapterNotReadyError(ConflictError):
    """The adapter's status does not allow serving it (e.g. its training failed)."""

    code = "adapter_not_ready"

    def __init__(self, adapter_id: int, status: str) -> None:
        super().__init__(MSG_NOT_READY.format(adapter_id=adapter_id, status=status), adapter_id=adapter_id)


class LineageConflictError(ConflictError):
    """An upload would add a version of another kind or document to an existing lineage."""

    code = "lineage_conflict"

    def __init__(self, existing: Adapter, target: UploadTarget) -> None:
        super().__init__(MSG_LINEAGE_TAKEN.format(
            lineage=existing.lineage, kind=existing.kind.value, document_id=existing.document_id,
            new_kind=target.kind.value, new_document_id=target.document_id), lineage=existing.lineage)


@dataclass(frozen=True)
class AdapterFilters:
    """Which adapters to list, and the page."""

    kind: AdapterKind | None = None
    document_id: int | None = None
    lineage: str | None = None
    limit: int = 100
    offset: int = 0


class AdminAdapterService:
    """The registry side and the engine side of adapter administration, within a caller's reach."""

    def __init__(self, state: AppState, adapters: AdapterService, metrics: ServerMetrics | None = None) -> None:
        self._state = state
        self._adapters = adapters
        self._metrics = metrics

    def list_adapters(self, tenant: Reach, filters: AdapterFilters) -> AdaptersPublic:
        """A page of the tenant's adapters, newest first, with the total matching the filters."""
        with transaction(self._state.sessions) as session:
            rows, total = adapter_repo.list_adapters(
                session, tenant=tenant, kind=filters.kind, document_id=filters.document_id,
                lineage=filters.lineage, limit=filters.limit, offset=filters.offset,
            )
            return AdaptersPublic(data=adapter_publics(session, rows), count=total)

    def get_adapter(self, tenant: Reach, adapter_id: int) -> AdapterPublic:
        """One adapter with the aliases pointing at it; NotFoundError when absent or another tenant's."""
        with transaction(self._state.sessions) as session:
            return adapter_publics(session, [adapter_repo.get_adapter(session, adapter_id, tenant=tenant)])[0]

    async def delete_adapter(self, tenant: Reach, adapter_id: int) -> None:
        """Delete the row (409 while aliased) and drop it from the engine; the blob stays for GC."""
        await asyncio.to_thread(self._delete_row, tenant, adapter_id)
        await self._drop_from_engine(adapter_id)

    def _delete_row(self, tenant: Reach, adapter_id: int) -> None:
        with write_transaction(self._state.sessions) as session:
            adapter_repo.delete_adapter(session, adapter_id, tenant=tenant)

    async def _drop_from_engine(self, adapter_id: int) -> None:
        generator = self._state.generator
        if generator is None or adapter_id not in generator.stats().loaded:
            return
        self._state.verified_paths.pop(adapter_id, None)
        try:
            # Unpinned first: should the unload below time out, LRU eviction can still remove it later.
            await generator.pin(adapter_id, False)
            await generator.unload_adapter(adapter_id)
        except AdapterNotLoadedError:
            return  # evicted meanwhile
        except EngineOverloadedError:
            log.warning("deleted adapter %s is still serving requests; it stays resident until evicted", adapter_id)

    def upload(self, tenant: str, target: UploadTarget, parts: Sequence[UploadPart]) -> AdapterPublic:
        """Stage, validate (format, rank, base-model shapes), store and register an adapter; alias it if asked."""
        with transaction(self._state.sessions) as session:
            self._check_target(session, tenant, target)
        settings = self._state.settings
        uploads = settings.data_dir / UPLOADS_DIRNAME
        uploads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="upload-", dir=uploads) as tmp:
            staged = Path(tmp)
            stage_upload(parts, staged, limit=settings.max_upload_bytes)
            self._check_fits(inspect_adapter_dir(staged))
            stored = self._state.store.put_dir(staged)
        return self._register(tenant, target, stored)

    def _check_target(self, session: Session, tenant: str, target: UploadTarget) -> None:
        if target.document_id is not None:
            get_document(session, target.document_id, tenant=tenant)
        stmt = select(Adapter).where(Adapter.tenant == tenant, Adapter.lineage == target.lineage).limit(1)
        existing = session.scalars(stmt).first()
        if existing is not None and (existing.kind.value, existing.document_id) != (
                target.kind.value, target.document_id):
            raise LineageConflictError(existing, target)

    def _check_fits(self, info: AdapterInfo) -> None:
        settings = self._state.settings
        shapes = base_module_shapes(resolve_base_model(settings))
        check_adapter_fits(info, shapes, model=self._state.base_model_id, max_rank=self._state.max_adapter_rank)

    def _register(self, tenant: str, target: UploadTarget, stored: StoredAdapter) -> AdapterPublic:
        with write_transaction(self._state.sessions) as session:
            self._check_target(session, tenant, target)
            data = adapter_repo.AdapterCreate.from_stored(
                stored, kind=AdapterKind(target.kind.value), lineage=target.lineage,
                base_model=self._state.base_model_id, document_id=target.document_id, tenant=tenant,
            )
            adapter = adapter_repo.register_adapter(session, data)
            if target.alias is not None:
                set_alias(session, target.alias, adapter.id, tenant=tenant)
            return adapter_publics(session, [adapter])[0]

    async def engine(self, tenant: Reach) -> EnginePublic:
        """The engine's counters and which of the tenant's (None: every tenant's) adapters it holds."""
        stats = self._state.require_generator().stats()
        if self._metrics is not None:
            refresh_engine_metrics(self._state, self._metrics)
        refs = await asyncio.to_thread(self._refs, tenant, stats.loaded)
        return engine_public(stats, refs, base_model=self._state.base_model_id)

    def _refs(self, tenant: Reach, ids: Sequence[int]) -> list[AdapterRef]:
        with transaction(self._state.sessions) as session:
            rows = session.scalars(select(Adapter).where(within(Adapter.tenant, tenant), Adapter.id.in_(ids))).all()
            by_id = {row.id: AdapterRef.of(row) for row in rows}
        return [by_id[i] for i in ids if i in by_id]

    async def load(self, tenant: Reach, adapter_id: int, *, pin: bool) -> EngineAdapterPublic:
        """Load a ready adapter from its verified files into the engine, optionally pinned."""
        ref = await asyncio.to_thread(self._ref, tenant, adapter_id, ready=True)
        generator = self._state.require_generator()
        await generator.load_adapter(await self._adapters.handle(ref), pin=pin)
        return engine_adapter_public(ref, generator.stats())

    async def unload(self, tenant: Reach, adapter_id: int) -> EngineAdapterPublic:
        """Remove an adapter from the engine once its requests finish; AdapterNotLoadedError when not resident."""
        ref = await asyncio.to_thread(self._ref, tenant, adapter_id)
        generator = self._state.require_generator()
        await generator.unload_adapter(ref.id)
        self._state.verified_paths.pop(ref.id, None)
        return engine_adapter_public(ref, generator.stats())

    async def pin(self, tenant: Reach, adapter_id: int, *, pinned: bool) -> EngineAdapterPublic:
        """Pin (never evicted) or unpin a resident adapter; AdapterNotLoadedError when not resident."""
        ref = await asyncio.to_thread(self._ref, tenant, adapter_id)
        generator = self._state.require_generator()
        await generator.pin(ref.id, pinned)
        return engine_adapter_public(ref, generator.stats())

    def _ref(self, tenant: Reach, adapter_id: int, *, ready: bool = False) -> AdapterRef:
        with transaction(self._state.sessions) as session:
            adapter = adapter_repo.get_adapter(session, adapter_id, tenant=tenant)
            if ready and adapter.status is not AdapterStatus.READY:
                raise AdapterNotReadyError(adapter.id, adapter.status.value)
            return AdapterRef.of(adapter)


def adapter_publics(session: Session, adapters: Sequence[Adapter]) -> list[AdapterPublic]:
    """Adapters as the API shows them, each with the names of the aliases pointing at it."""
    ids = [adapter.id for adapter in adapters]
    names: dict[int, list[str]] = {}
    for adapter_id, name in session.execute(
            select(Alias.adapter_id, Alias.name).where(Alias.adapter_id.in_(ids)).order_by(Alias.name)):
        names.setdefault(adapter_id, []).append(name)
    return [AdapterPublic.model_validate(a).model_copy(update={"aliases": names.get(a.id, [])}) for a in adapters]


def engine_adapter_public(ref: AdapterRef, stats: EngineStats) -> EngineAdapterPublic:
    """An adapter's residency in the engine."""
    return EngineAdapterPublic(id=ref.id, kind=ref.kind, lineage=ref.lineage, version=ref.version,
                               loaded=ref.id in stats.loaded, pinned=ref.id in stats.pinned)


def hit_rate(stats: EngineStats) -> float:
    """Share of adapter lookups served by a resident adapter (0 before the first lookup)."""
    lookups = stats.hits + stats.misses
    return stats.hits / lookups if lookups else 0.0


def engine_public(stats: EngineStats, refs: Sequence[AdapterRef], *, base_model: str) -> EnginePublic:
    """The engine view: counters for everyone, adapter details for the given (the tenant's) resident adapters."""
    return EnginePublic(
        engine=stats.engine, base_model=base_model, adapters=[engine_adapter_public(r, stats) for r in refs],
        loaded_count=len(stats.loaded), pinned_count=len(stats.pinned), capacity=stats.capacity,
        loads=stats.loads, evictions=stats.evictions, hits=stats.hits, misses=stats.misses,
        hit_rate=hit_rate(stats), queued=stats.queued, running=stats.running, batches=stats.batches,
        batched_rows=stats.batched_rows, forward_calls=stats.forward_calls,
    )


def refresh_engine_metrics(state: AppState, metrics: ServerMetrics) -> None:
    """Copy the engine's adapter-cache counters into the Prometheus gauges (no-op while no engine runs)."""
    if state.generator is None:
        return
    stats = state.generator.stats()
    metrics.adapter_loads.set(stats.loads)
    metrics.adapter_evictions.set(stats.evictions)
    metrics.adapter_cache_hit_rate.set(hit_rate(stats))
    metrics.adapters_loaded.set(len(stats.loaded))
