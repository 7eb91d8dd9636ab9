"""Dependencies shared by routers, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from registry.api_keys import Scope
from server.auth import Principal, authenticate_request, require
from server.services.adapters import AdapterService
from server.services.retrieval import RetrievalService
from server.state import AppState


def get_state(request: Request) -> AppState:
    """The app's long-lived state."""
    state: AppState = request.app.state.kmserve
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_adapter_service(request: Request) -> AdapterService:
    """Verified engine handles and the KM+KE combined-adapter cache."""
    service: AdapterService = request.app.state.adapter_service
    return service


AdapterServiceDep = Annotated[AdapterService, Depends(get_adapter_service)]


def get_retrieval(request: Request) -> RetrievalService:
    """The retrieve stage: the app's vector index and embedder, opened on first use."""
    service: RetrievalService = request.app.state.retrieval
    return service


RetrievalDep = Annotated[RetrievalService, Depends(get_retrieval)]


def get_principal(request: Request, state: StateDep) -> Principal:
    """The authenticated caller (401 when auth is on and no valid key was sent)."""
    return authenticate_request(state, request)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _scoped(scope: Scope) -> object:
    def dependency(principal: PrincipalDep) -> Principal:
        return require(principal, scope)

    dependency.__name__ = f"require_{scope.value}"
    return Depends(dependency)


# `?tenant=`: an operator lists or acts in that tenant; any other key may name only its own (else 403).
TenantQuery = Annotated[str | None, Query(
    min_length=1, max_length=64, description="Operator keys: the tenant to list or act in. Other keys: their own.")]

QueryPrincipal = Annotated[Principal, _scoped(Scope.QUERY)]
UploadPrincipal = Annotated[Principal, _scoped(Scope.UPLOAD)]
AdminPrincipal = Annotated[Principal, _scoped(Scope.ADMIN)]
