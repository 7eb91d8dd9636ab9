"""Admin routes for API keys and aliases (admin scope; other tenants' are 404 unless the key is an operator's)."""

from __future__ import annotations

from fastapi import APIRouter, status

from registry import adapters as adapter_repo
from registry import aliases as alias_repo
from registry import api_keys as key_repo
from registry.db import transaction, write_transaction
from registry.models import Alias
from server.auth import require_grant
from server.deps import AdminPrincipal, StateDep, TenantQuery
from server.schemas.admin import (
    AliasesPublic,
    AliasPublic,
    AliasUpdate,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    ApiKeysPublic,
)
from server.schemas.common import IdPath, NamePath

router = APIRouter(prefix="/admin", tags=["admin"])


FORBIDDEN_GRANT: dict[int | str, dict[str, str]] = {
    403: {"description": "an operator key, or another tenant's, asked for without the operator scope"}}


def _alias_public(alias: Alias) -> AliasPublic:
    return AliasPublic(name=alias.name, adapter_id=alias.adapter_id, lineage=alias.adapter.lineage,
                       version=alias.adapter.version, revision=alias.revision, updated_at=alias.updated_at,
                       tenant=alias.tenant)


@router.post("/keys", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED, responses=FORBIDDEN_GRANT)
def create_key(body: ApiKeyCreate, principal: AdminPrincipal, state: StateDep, tenant: TenantQuery = None
               ) -> ApiKeyCreated:
    """Create an API key in the caller's tenant (operator: `?tenant=`); the secret is shown in this response only."""
    owner = principal.acting_for(tenant)
    require_grant(principal, owner, body.scopes)
    with write_transaction(state.sessions) as session:
        key, plaintext = key_repo.create_api_key(session, body.name, body.scopes, tenant=owner)
        return ApiKeyCreated(**ApiKeyPublic.model_validate(key).model_dump(), key=plaintext)


@router.get("/keys", response_model=ApiKeysPublic)
def list_keys(principal: AdminPrincipal, state: StateDep, include_revoked: bool = False,
              tenant: TenantQuery = None) -> ApiKeysPublic:
    """List the tenant's API keys (never their secrets); an operator sees every tenant's."""
    with transaction(state.sessions) as session:
        keys = key_repo.list_api_keys(session, tenant=principal.listing(tenant), include_revoked=include_revoked)
        data = [ApiKeyPublic.model_validate(k) for k in keys]
    return ApiKeysPublic(data=data, count=len(data))


@router.delete("/keys/{key_id}", response_model=ApiKeyPublic, responses=FORBIDDEN_GRANT)
def revoke_key(key_id: IdPath, principal: AdminPrincipal, state: StateDep) -> ApiKeyPublic:
    """Revoke an API key; it stops working at once. Only an operator revokes an operator key."""
    with write_transaction(state.sessions) as session:
        key = key_repo.get_api_key(session, key_id, tenant=principal.reach)
        require_grant(principal, key.tenant, key.scopes)
        return ApiKeyPublic.model_validate(key_repo.revoke_api_key(session, key_id, tenant=key.tenant))


@router.get("/aliases", response_model=AliasesPublic)
def list_aliases(principal: AdminPrincipal, state: StateDep, tenant: TenantQuery = None) -> AliasesPublic:
    """List aliases and the adapter versions they point at."""
    with transaction(state.sessions) as session:
        data = [_alias_public(a) for a in alias_repo.list_aliases(session, tenant=principal.listing(tenant))]
    return AliasesPublic(data=data, count=len(data))


@router.put("/aliases/{name}", response_model=AliasPublic)
def put_alias(name: NamePath, body: AliasUpdate, principal: AdminPrincipal, state: StateDep,
              tenant: TenantQuery = None) -> AliasPublic:
    """Point an alias at an adapter version of its tenant (the hot swap: the next request uses it).

    The version's files are verified first: an alias never moves to weights that fail their checksum (503
    `adapter_corrupt`, the alias stays where it was)."""
    owner = principal.acting_for(tenant)
    with transaction(state.sessions) as session:
        uri = adapter_repo.get_adapter(session, body.adapter_id, tenant=owner).uri
    state.store.open(uri)
    with write_transaction(state.sessions) as session:
        return _alias_public(alias_repo.set_alias(session, name, body.adapter_id, tenant=owner))


@router.delete("/aliases/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alias(name: str, principal: AdminPrincipal, state: StateDep, tenant: TenantQuery = None) -> None:
    """Delete an alias (the adapter stays)."""
    owner = principal.acting_for(tenant)
    with write_transaction(state.sessions) as session:
        alias_repo.delete_alias(session, name, tenant=owner)
