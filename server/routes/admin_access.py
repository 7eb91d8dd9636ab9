"""Admin routes for API keys and aliases (admin scope)."""

from __future__ import annotations

from fastapi import APIRouter, status

from registry import aliases as alias_repo
from registry import api_keys as key_repo
from registry.db import transaction, write_transaction
from registry.models import Alias
from server.deps import AdminPrincipal, StateDep
from server.schemas.admin import (
    AliasesPublic,
    AliasPublic,
    AliasUpdate,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    ApiKeysPublic,
)

router = APIRouter(prefix="/admin", tags=["admin"])


def _alias_public(alias: Alias) -> AliasPublic:
    return AliasPublic(name=alias.name, adapter_id=alias.adapter_id, lineage=alias.adapter.lineage,
                       version=alias.adapter.version, revision=alias.revision, updated_at=alias.updated_at)


@router.post("/keys", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED)
def create_key(body: ApiKeyCreate, principal: AdminPrincipal, state: StateDep) -> ApiKeyCreated:
    """Create an API key; the secret is shown in this response only."""
    with write_transaction(state.sessions) as session:
        key, plaintext = key_repo.create_api_key(session, body.name, body.scopes, tenant=principal.tenant)
        return ApiKeyCreated(**ApiKeyPublic.model_validate(key).model_dump(), key=plaintext)


@router.get("/keys", response_model=ApiKeysPublic)
def list_keys(principal: AdminPrincipal, state: StateDep, include_revoked: bool = False) -> ApiKeysPublic:
    """List the tenant's API keys (never their secrets)."""
    with transaction(state.sessions) as session:
        keys = key_repo.list_api_keys(session, tenant=principal.tenant, include_revoked=include_revoked)
        data = [ApiKeyPublic.model_validate(k) for k in keys]
    return ApiKeysPublic(data=data, count=len(data))


@router.delete("/keys/{key_id}", response_model=ApiKeyPublic)
def revoke_key(key_id: int, principal: AdminPrincipal, state: StateDep) -> ApiKeyPublic:
    """Revoke an API key; it stops working at once."""
    with write_transaction(state.sessions) as session:
        return ApiKeyPublic.model_validate(key_repo.revoke_api_key(session, key_id, tenant=principal.tenant))


@router.get("/aliases", response_model=AliasesPublic)
def list_aliases(principal: AdminPrincipal, state: StateDep) -> AliasesPublic:
    """List aliases and the adapter versions they point at."""
    with transaction(state.sessions) as session:
        data = [_alias_public(a) for a in alias_repo.list_aliases(session, tenant=principal.tenant)]
    return AliasesPublic(data=data, count=len(data))


@router.put("/aliases/{name}", response_model=AliasPublic)
def put_alias(name: str, body: AliasUpdate, principal: AdminPrincipal, state: StateDep) -> AliasPublic:
    """Point an alias at an adapter version (the hot swap: the next request uses it)."""
    with write_transaction(state.sessions) as session:
        return _alias_public(alias_repo.set_alias(session, name, body.adapter_id, tenant=principal.tenant))


@router.delete("/aliases/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alias(name: str, principal: AdminPrincipal, state: StateDep) -> None:
    """Delete an alias (the adapter stays)."""
    with write_transaction(state.sessions) as session:
        alias_repo.delete_alias(session, name, tenant=principal.tenant)
