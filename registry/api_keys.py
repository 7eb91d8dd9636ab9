"""API keys: created once in plain text, stored only as SHA-256, scoped, revocable."""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.errors import InvalidScopeError
from registry.models import DEFAULT_TENANT, ApiKey, utcnow
from registry.tenancy import Reach, get_owned, within

KEY_PREFIX = "kms_"
LAST_USED_RESOLUTION = timedelta(minutes=1)
DISPLAY_PREFIX_LEN = 12


class Scope(enum.StrEnum):
    """What a key may do; admin implies query and upload within its tenant; operator implies admin in every tenant."""

    QUERY = "query"
    UPLOAD = "upload"
    ADMIN = "admin"
    OPERATOR = "operator"


def grants(scopes: Iterable[str], scope: Scope) -> bool:
    """True when holding `scopes` grants `scope` (operator grants all, admin all but operator)."""
    held = set(scopes)
    if Scope.OPERATOR.value in held:
        return True
    return scope.value in held or (Scope.ADMIN.value in held and scope is not Scope.OPERATOR)


def hash_key(plaintext: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def parse_scopes(scopes: Iterable[str]) -> list[Scope]:
    """Validate scope names; InvalidScopeError names the unknown one."""
    allowed = [s.value for s in Scope]
    parsed: list[Scope] = []
    for scope in scopes:
        if scope not in allowed:
            raise InvalidScopeError(scope, allowed)
        parsed.append(Scope(scope))
    return sorted(set(parsed), key=allowed.index)


def create_api_key(
    session: Session, name: str, scopes: Iterable[str], *, tenant: str = DEFAULT_TENANT
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plain-text key, which is shown once and never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant=tenant, name=name, prefix=plaintext[:DISPLAY_PREFIX_LEN], key_hash=hash_key(plaintext),
        scopes=[s.value for s in parse_scopes(scopes)],
    )
    session.add(key)
    session.flush()
    return key, plaintext


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The active key matching `plaintext`, or None (unknown or revoked). Reads only."""
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext))).one_or_none()
    if key is None or not key.active:
        return None
    return key


def last_use_is_stale(key: ApiKey, now: datetime | None = None) -> bool:
    """True when `last_used_at` is older than LAST_USED_RESOLUTION (stamping every request would serialize them)."""
    now = now or utcnow()
    return key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION


def touch_api_key(session: Session, key_id: int) -> None:
    """Record that a key was used now."""
    key = session.get(ApiKey, key_id)
    if key is not None:
        key.last_used_at = utcnow()
        session.flush()


def has_scope(key: ApiKey, scope: Scope) -> bool:
    """True when the key grants `scope` (see `grants`)."""
    return grants(key.scopes, scope)


def list_api_keys(
    session: Session, *, tenant: Reach = DEFAULT_TENANT, include_revoked: bool = False
) -> Sequence[ApiKey]:
    """The tenant's keys (tenant=None: every tenant's), oldest first."""
    stmt = select(ApiKey).where(within(ApiKey.tenant, tenant))
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return session.scalars(stmt.order_by(ApiKey.id)).all()


def get_api_key(session: Session, key_id: int, *, tenant: Reach = DEFAULT_TENANT) -> ApiKey:
    """A key by id; NotFoundError when absent or another tenant's (tenant=None: any tenant)."""
    return get_owned(session, ApiKey, key_id, tenant, "api key")


def revoke_api_key(session: Session, key_id: int, *, tenant: Reach = DEFAULT_TENANT) -> ApiKey:
    """Revoke a key: it stops authenticating at once; the row stays for audit."""
    key = get_api_key(session, key_id, tenant=tenant)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def count_keys_with(session: Session, scope: Scope) -> int:
    """How many active keys grant `scope`."""
    keys = session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
    return sum(1 for k in keys if grants(k.scopes, scope))


def count_admin_keys(session: Session) -> int:
    """How many active admin keys exist, operator keys included."""
    return count_keys_with(session, Scope.ADMIN)


def count_operator_keys(session: Session) -> int:
    """How many active operator keys exist (the first start creates one when there are none)."""
    return count_keys_with(session, Scope.OPERATOR)
