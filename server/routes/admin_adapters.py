"""Admin routes for adapters and the generation engine (admin scope; other tenants' adapters are 404 unless the key
is an operator's)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile, status

from registry.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from registry.models import AdapterKind
from server.deps import AdapterServiceDep, AdminPrincipal, StateDep, TenantQuery
from server.schemas.adapters import (
    AdapterLoad,
    AdapterPin,
    AdapterPublic,
    AdaptersPublic,
    AdapterUploadKind,
    EngineAdapterPublic,
    EnginePublic,
)
from server.schemas.common import DB_INT_MAX, IdPath, IdQuery, NameQuery, OffsetQuery
from server.services.adapter_uploads import UploadPart, upload_target
from server.services.admin_adapters import AdapterFilters, AdminAdapterService

router = APIRouter(prefix="/admin", tags=["admin"])

UPLOAD_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "document_id is not one of the tenant's documents"},
    409: {"description": "the lineage holds adapters of another kind or document"},
    413: {"description": "the files exceed KMSERVE_MAX_UPLOAD_BYTES"},
    415: {"description": "a pickle weight file (.bin, .pt, ...) was sent"},
    422: {"description": "malformed adapter, rank over the limit, or modules/shapes the base model lacks"},
}


def get_admin_adapter_service(
    request: Request, state: StateDep, adapters: AdapterServiceDep
) -> AdminAdapterService:
    """The adapter administration service of this app."""
    return AdminAdapterService(state, adapters, request.app.state.metrics)


AdminAdaptersDep = Annotated[AdminAdapterService, Depends(get_admin_adapter_service)]


def upload_parts(
    adapter_config: UploadFile | None, adapter_model: UploadFile | None, files: list[UploadFile] | None
) -> list[UploadPart]:
    """The uploaded files, each named by the adapter file it stands for."""
    named = [(CONFIG_NAME, adapter_config), (WEIGHTS_NAME, adapter_model)]
    parts = [UploadPart(name, f.filename or name, f.file) for name, f in named if f is not None]
    parts += [UploadPart(PurePath(f.filename or "").name, f.filename or "", f.file) for f in files or []]
    return parts


@router.get("/adapters", response_model=AdaptersPublic)
def list_adapters(
    principal: AdminPrincipal, service: AdminAdaptersDep, kind: AdapterKind | None = None,
    document_id: IdQuery = None, lineage: NameQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: OffsetQuery = 0,
    tenant: TenantQuery = None,
) -> AdaptersPublic:
    """List the tenant's adapter versions, newest first (filter by kind, document, lineage; operator: tenant)."""
    filters = AdapterFilters(kind=kind, document_id=document_id, lineage=lineage, limit=limit, offset=offset)
    return service.list_adapters(principal.listing(tenant), filters)


@router.post("/adapters", response_model=AdapterPublic, status_code=status.HTTP_201_CREATED,
             responses=UPLOAD_ERRORS)
def upload_adapter(
    principal: AdminPrincipal, service: AdminAdaptersDep,
    kind: Annotated[AdapterUploadKind, Form(description="km, ke, compressor, reranker or reasoner.")],
    lineage: Annotated[str | None, Form(description="Lineage; km default `km:<document_id>`, else required.")] = None,
    document_id: Annotated[int | None, Form(
        ge=1, le=DB_INT_MAX, description="The tenant's document; required for km.")] = None,
    alias: Annotated[str | None, Form(description=(
        "Alias to point at the new version. Omitted: km moves `km:<document_id>`, other kinds set none. "
        "`false`: set none."))] = None,
    adapter_config: Annotated[UploadFile | None, File(description="adapter_config.json")] = None,
    adapter_model: Annotated[UploadFile | None, File(description="adapter_model.safetensors")] = None,
    files: Annotated[list[UploadFile] | None, File(description=(
        "Alternative to the two fields: files named adapter_config.json and adapter_model.safetensors "
        "(others such as README.md are ignored)."))] = None,
    tenant: TenantQuery = None,
) -> AdapterPublic:
    """Upload a PEFT LoRA adapter; it is validated against the base model before anything is stored."""
    owner = principal.acting_for(tenant)
    target = upload_target(kind, lineage=lineage, document_id=document_id, alias=alias)
    return service.upload(owner, target, upload_parts(adapter_config, adapter_model, files))


@router.get("/adapters/{adapter_id}", response_model=AdapterPublic)
def get_adapter(adapter_id: IdPath, principal: AdminPrincipal, service: AdminAdaptersDep) -> AdapterPublic:
    """One adapter version: every registry field and the aliases pointing at it."""
    return service.get_adapter(principal.reach, adapter_id)


@router.delete("/adapters/{adapter_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={409: {"description": "an alias points at it (adapter_in_use)"}})
async def delete_adapter(adapter_id: IdPath, principal: AdminPrincipal, service: AdminAdaptersDep) -> None:
    """Delete an adapter version (refused while aliased) and unload it; its blob is left to GC."""
    await service.delete_adapter(principal.reach, adapter_id)


@router.get("/engine", response_model=EnginePublic)
async def get_engine(principal: AdminPrincipal, service: AdminAdaptersDep, tenant: TenantQuery = None
                     ) -> EnginePublic:
    """The engine: the tenant's resident adapters (operator: every tenant's), capacity, cache and batching counters."""
    return await service.engine(principal.listing(tenant))


@router.post("/adapters/{adapter_id}/load", response_model=EngineAdapterPublic)
async def load_adapter(
    adapter_id: IdPath, principal: AdminPrincipal, service: AdminAdaptersDep, body: AdapterLoad | None = None
) -> EngineAdapterPublic:
    """Load an adapter into the engine from its verified files (body `{"pin": true}` also pins it)."""
    return await service.load(principal.reach, adapter_id, pin=(body or AdapterLoad()).pin)


@router.post("/adapters/{adapter_id}/unload", response_model=EngineAdapterPublic,
             responses={404: {"description": "not loaded (adapter_not_loaded) or no such adapter"}})
async def unload_adapter(
    adapter_id: IdPath, principal: AdminPrincipal, service: AdminAdaptersDep
) -> EngineAdapterPublic:
    """Unload an adapter from the engine once its in-flight requests finish."""
    return await service.unload(principal.reach, adapter_id)


@router.post("/adapters/{adapter_id}/pin", response_model=EngineAdapterPublic,
             responses={404: {"description": "not loaded (adapter_not_loaded) or no such adapter"}})
async def pin_adapter(
    adapter_id: IdPath, principal: AdminPrincipal, service: AdminAdaptersDep, body: AdapterPin | None = None
) -> EngineAdapterPublic:
    """Pin a loaded adapter so it is never evicted (body `{"pinned": false}` unpins)."""
    return await service.pin(principal.reach, adapter_id, pinned=(body or AdapterPin()).pinned)
