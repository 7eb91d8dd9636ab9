"""Aliases: movable names for adapter versions. Moving one is the hot swap servers pick up."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.adapters import get_adapter
from registry.errors import NotFoundError
from registry.models import DEFAULT_TENANT, Adapter, Alias, utcnow
from registry.tenancy import Reach, owned, within


def set_alias(session: Session, name: str, adapter_id: int, *, tenant: str = DEFAULT_TENANT) -> Alias:
    """Point `name` at an adapter (create or move) and bump its revision; the adapter must be the tenant's."""
    adapter = get_adapter(session, adapter_id, tenant=tenant)
    alias = _find(session, name, tenant=tenant, lock=True)
    if alias is None:
        alias = Alias(tenant=tenant, name=name, adapter_id=adapter.id, revision=1, updated_at=utcnow())
        try:
            with session.begin_nested():
                session.add(alias)
            return alias
        except IntegrityError:
            # Created concurrently: fall through and move it instead.
            alias = _find(session, name, tenant=tenant, lock=True)
            if alias is None:
                raise
    if alias.adapter_id != adapter.id:
        alias.adapter_id = adapter.id
        alias.adapter = adapter
        alias.revision += 1
        alias.updated_at = utcnow()
        session.flush()
    return alias


def _find(session: Session, name: str, *, tenant: str, lock: bool = False) -> Alias | None:
    stmt = select(Alias).where(Alias.tenant == tenant, Alias.name == name)
    if lock:
        stmt = stmt.with_for_update(of=Alias)
    return session.scalars(stmt).unique().one_or_none()


def get_alias(session: Session, name: str, *, tenant: str = DEFAULT_TENANT) -> Alias:
    """An alias by name; NotFoundError when absent."""
    alias = _find(session, name, tenant=tenant)
    if alias is None:
        raise NotFoundError("alias", name)
    return alias


def resolve_alias(session: Session, name: str, *, tenant: str = DEFAULT_TENANT) -> Adapter:
    """The adapter version an alias points at right now (never another tenant's adapter)."""
    return owned(get_alias(session, name, tenant=tenant).adapter, tenant, "alias", name)


def list_aliases(session: Session, *, tenant: Reach = DEFAULT_TENANT) -> Sequence[Alias]:
    """The tenant's aliases (tenant=None: every tenant's), by name."""
    stmt = select(Alias).where(within(Alias.tenant, tenant)).order_by(Alias.name, Alias.tenant)
    return session.scalars(stmt).unique().all()


def aliases_changed_since(session: Session, since: datetime, *, tenant: str | None = None) -> Sequence[Alias]:
    """Aliases moved or created after `since` (what a replica polls to learn of hot swaps)."""
    stmt = select(Alias).where(Alias.updated_at > since)
    if tenant is not None:
        stmt = stmt.where(Alias.tenant == tenant)
    return session.scalars(stmt.order_by(Alias.updated_at)).unique().all()


def delete_alias(session: Session, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
    """Remove an alias (the adapter it pointed at stays)."""
    session.delete(get_alias(session, name, tenant=tenant))
    session.flush()
