"""Turning resolved adapter versions into engine handles: verified files, and KM+KE combined into one adapter."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence

from sqlalchemy import select

from engines.base import AdapterHandle
from registry.adapters import AdapterCreate, register_adapter
from registry.db import write_transaction
from registry.errors import NotFoundError
from registry.models import Adapter, AdapterKind, AdapterStatus
from server.services.resolver import AdapterRef, Resolution
from server.state import AppState

# A KE records its learned per-layer mixing weights here: {"km": [w_M per layer], "ke": [w_E per layer]}.
LAYER_WEIGHTS_KEY = "layer_weights"


class AdapterService:
    """Verified handles for the engine, and the cache of combined KM+KE adapters."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._locks: dict[str, asyncio.Lock] = {}

    async def handle_for(self, resolution: Resolution) -> tuple[AdapterHandle | None, AdapterRef | None]:
        """The one adapter the engine should run for a request, and its registry reference."""
        served: AdapterRef | None
        if resolution.km is not None and resolution.ke is not None:
            served = await self.combined(resolution.km, resolution.ke)
        else:
            served = resolution.km or resolution.ke or resolution.alias
        if served is None:
            return None, None
        return await self.handle(served), served

    async def handle(self, ref: AdapterRef) -> AdapterHandle:
        """A handle whose files were verified: reused while the engine holds the adapter, verified again after."""
        generator = self._state.require_generator()
        path = self._state.verified_paths.get(ref.id)
        if path is None or ref.id not in generator.stats().loaded:
            path = await asyncio.to_thread(self._state.store.open, ref.uri)
            self._state.verified_paths[ref.id] = path
        return AdapterHandle(id=ref.id, key=ref.key, path=path, rank=ref.rank)

    async def combined(self, km: AdapterRef, ke: AdapterRef) -> AdapterRef:
        """The stored KM+KE adapter for these two versions and the KE's weights, built once and then reused.

        Both must be one tenant's; the combined adapter is that tenant's too, so no other tenant ever finds it.
        """
        if ke.tenant != km.tenant:
            raise NotFoundError("knowledge extractor", ke.lineage)
        lineage = combined_lineage(km, ke)
        lock = self._locks.setdefault(lineage, asyncio.Lock())
        async with lock:
            existing = await asyncio.to_thread(self._find, km.tenant, lineage)
            if existing is not None:
                return existing
            return await asyncio.to_thread(self._build, km, ke, lineage)

    def _find(self, tenant: str, lineage: str) -> AdapterRef | None:
        with self._state.sessions() as session:
            stmt = (select(Adapter).where(Adapter.tenant == tenant, Adapter.lineage == lineage,
                                          Adapter.status == AdapterStatus.READY)
                    .order_by(Adapter.version.desc()).limit(1))
            adapter = session.scalars(stmt).one_or_none()
            return AdapterRef.of(adapter) if adapter else None

    def _build(self, km: AdapterRef, ke: AdapterRef, lineage: str) -> AdapterRef:
        from registry.lora import LoraWeights, combine

        store = self._state.store
        parts = [LoraWeights.from_dir(store.open(ref.uri)) for ref in (km, ke)]
        merged = combine(parts, mixing_weights(ke))
        stored = store.put(merged.config, merged.tensors)
        with write_transaction(self._state.sessions) as session:
            stmt = select(Adapter).where(Adapter.tenant == km.tenant, Adapter.lineage == lineage)
            again = session.scalars(stmt).first()
            if again is not None:  # another replica built it meanwhile
                return AdapterRef.of(again)
            base = parts[0].config.get("base_model_name_or_path")
            data = AdapterCreate.from_stored(
                stored, kind=AdapterKind.COMBINED, lineage=lineage, base_model=str(base) if base else None,
                document_id=km.document_id, config={"sources": {"km": km.id, "ke": ke.id}}, tenant=km.tenant,
            )
            return AdapterRef.of(register_adapter(session, data))


def mixing_weights(ke: AdapterRef) -> list[float | Sequence[float]]:
    """The KE's learned per-layer weights (w_M, w_E), or a plain sum when it recorded none."""
    weights = ke.config.get(LAYER_WEIGHTS_KEY)
    if isinstance(weights, dict) and "km" in weights and "ke" in weights:
        return [list(weights["km"]), list(weights["ke"])]
    return [1.0, 1.0]


def combined_lineage(km: AdapterRef, ke: AdapterRef) -> str:
    """The cache key of a KM+KE adapter: both versions and the weights that mix them."""
    digest = hashlib.sha256(json.dumps(mixing_weights(ke), sort_keys=True).encode()).hexdigest()[:12]
    return f"combined:{km.id}+{ke.id}:{digest}"
