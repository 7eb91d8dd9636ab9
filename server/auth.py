"""API-key authentication and scope checks.

Keys arrive as `Authorization: Bearer <key>` (what the OpenAI client sends) or `X-API-Key: <key>`.
With KMSERVE_AUTH=off every request acts as the default tenant with every scope.

Tenancy: a key reaches only its tenant's objects (another tenant's read as missing: 404); an operator key reaches
every tenant's, and may name one with `?tenant=` to list or act there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import Request

from registry.api_keys import Scope, authenticate, grants, last_use_is_stale, touch_api_key
from registry.db import transaction, write_transaction
from registry.errors import RegistryError
from registry.models import DEFAULT_TENANT
from registry.tenancy import Reach
from server.state import AppState

MSG_NO_KEY = "missing or invalid API key; send 'Authorization: Bearer <key>' (the admin key is in the data dir)."
MSG_NO_SCOPE = "this API key lacks the '{scope}' scope; ask an admin for a key that has it."


class UnauthorizedError(RegistryError):
    """No valid API key was presented."""

    code = "unauthorized"
    status = 401

    def __init__(self, message: str = MSG_NO_KEY) -> None:
        super().__init__(message)


class ForbiddenError(RegistryError):
    """The key is valid but lacks the scope the route needs."""

    code = "forbidden"
    status = 403

    def __init__(self, scope: Scope) -> None:
        super().__init__(MSG_NO_SCOPE.format(scope=scope.value))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's tenant and scopes (key_id None when auth is off)."""

    tenant: str
    scopes: frozenset[str]
    key_id: int | None = None

    def allows(self, scope: Scope) -> bool:
        """True when the principal holds `scope` (operator holds all; admin all but operator)."""
        return grants(self.scopes, scope)

    @property
    def operator(self) -> bool:
        """True for an operator, who reaches every tenant."""
        return self.allows(Scope.OPERATOR)

    @property
    def reach(self) -> Reach:
        """Whose objects this caller may read and act on by id: its tenant's, or everyone's (None) for an operator."""
        return None if self.operator else self.tenant

    def listing(self, tenant: str | None = None) -> Reach:
        """Whose objects a list shows: `tenant` when given (another tenant needs operator), else everything in reach."""
        if tenant is None:
            return self.reach
        return self.acting_for(tenant)

    def acting_for(self, tenant: str | None = None) -> str:
        """The tenant a create or a by-name action works in: the caller's own, or (operator only) the one named."""
        if tenant is None or tenant == self.tenant:
            return self.tenant
        if not self.operator:
            raise ForbiddenError(Scope.OPERATOR)
        return tenant


ANONYMOUS_ADMIN = Principal(tenant=DEFAULT_TENANT, scopes=frozenset(s.value for s in Scope))


def presented_key(request: Request) -> str | None:
    """The API key in the request headers, if any."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def authenticate_request(state: AppState, request: Request) -> Principal:
    """The principal behind the request; UnauthorizedError when auth is on and no active key was sent."""
    if state.settings.auth == "off":
        return ANONYMOUS_ADMIN
    plaintext = presented_key(request)
    if not plaintext:
        raise UnauthorizedError()
    with transaction(state.sessions) as session:
        key = authenticate(session, plaintext)
        if key is None:
            raise UnauthorizedError()
        principal = Principal(tenant=key.tenant, scopes=frozenset(key.scopes), key_id=key.id)
        stale = last_use_is_stale(key)
    if stale:
        with write_transaction(state.sessions) as session:
            touch_api_key(session, key.id)
    return principal


def require(principal: Principal, scope: Scope) -> Principal:
    """The principal, if it holds `scope`; ForbiddenError otherwise."""
    if not principal.allows(scope):
        raise ForbiddenError(scope)
    return principal


def require_grant(principal: Principal, tenant: str, scopes: Iterable[str]) -> None:
    """403 for a key only an operator may create or revoke: one of another tenant, or an operator key."""
    if tenant != principal.tenant or grants(scopes, Scope.OPERATOR):
        require(principal, Scope.OPERATOR)
