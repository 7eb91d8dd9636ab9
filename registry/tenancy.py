"""Tenant scoping: the one rule every lookup by id or name and every listing goes through.

A reach is a tenant name, or None for every tenant (an operator). Another tenant's row reads exactly like a missing
one (NotFoundError), so a 404 never tells a caller that the object exists elsewhere.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, true
from sqlalchemy.orm import InstrumentedAttribute, Session

from registry.errors import NotFoundError

# The tenants a caller reaches: one tenant's name, or None for all of them.
Reach = str | None


class TenantOwned(Protocol):
    """A registry row that belongs to a tenant."""

    tenant: Any


RowT = TypeVar("RowT", bound=TenantOwned)


def reaches(reach: Reach, tenant: str) -> bool:
    """True when a caller with `reach` may see objects of `tenant`."""
    return reach is None or reach == tenant


def owned(row: RowT | None, reach: Reach, kind: str, key: object) -> RowT:
    """The row when it exists and is within reach; NotFoundError(kind, key) otherwise (also for another tenant's)."""
    if row is None or not reaches(reach, row.tenant):
        raise NotFoundError(kind, key)
    return row


def get_owned(session: Session, model: type[RowT], row_id: int, reach: Reach, kind: str) -> RowT:
    """A row by primary key, within reach (see `owned`)."""
    return owned(session.get(model, row_id), reach, kind, row_id)


def within(column: InstrumentedAttribute[str], reach: Reach) -> ColumnElement[bool]:
    """The WHERE clause that keeps rows of the tenants in reach."""
    return true() if reach is None else column == reach
