"""Schemas of the admin adapter and engine routes."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from registry.models import AdapterKind, AdapterStatus


class AdapterUploadKind(enum.StrEnum):
    """Kinds an adapter may be uploaded as (combined KM+KE adapters are built by the server only)."""

    KM = "km"
    KE = "ke"
    COMPRESSOR = "compressor"
    RERANKER = "reranker"
    REASONER = "reasoner"


class AdapterPublic(BaseModel):
    """One adapter version as the registry records it, with the aliases pointing at it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    tenant: str
    kind: AdapterKind
    lineage: str
    version: int
    document_id: int | None
    base_model: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    sha256: str
    size_bytes: int
    uri: str
    status: AdapterStatus
    metrics: dict[str, Any]
    config: dict[str, Any]
    writer_versions: dict[str, Any]
    created_at: datetime
    aliases: list[str] = Field(default_factory=list, description="Aliases that point at this version.")


class AdaptersPublic(BaseModel):
    """A page of adapters and the total matching the filters."""

    data: list[AdapterPublic]
    count: int


class AdapterLoad(BaseModel):
    """How to load an adapter into the engine."""

    pin: bool = Field(False, description="Also pin it: a pinned adapter is never evicted.")


class AdapterPin(BaseModel):
    """Whether an adapter should be pinned."""

    pinned: bool = Field(True, description="true pins (never evicted); false lets the LRU evict it again.")


class EngineAdapterPublic(BaseModel):
    """An adapter's state in the engine."""

    id: int
    kind: str
    lineage: str
    version: int
    loaded: bool
    pinned: bool


class EnginePublic(BaseModel):
    """The generation engine: resident adapters and cache and batching counters."""

    engine: str
    base_model: str
    adapters: list[EngineAdapterPublic] = Field(description="This tenant's adapters resident in the engine, LRU first.")
    loaded_count: int = Field(description="Adapters resident in the engine, every tenant's.")
    pinned_count: int = Field(description="Pinned adapters, every tenant's.")
    capacity: int
    loads: int
    evictions: int
    hits: int
    misses: int
    hit_rate: float = Field(description="hits / (hits + misses); 0 before the first request with an adapter.")
    queued: int
    running: int
    batches: int
    batched_rows: int
    forward_calls: int
