"""Schemas of the admin routes: API keys and aliases."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from registry.api_keys import Scope
from server.schemas.common import DB_INT_MAX, Text


class ApiKeyCreate(BaseModel):
    """A key to create."""

    name: Text = Field(min_length=1, max_length=255)
    scopes: list[Scope] = Field(min_length=1, description=(
        "query, upload, admin (implies query and upload) and/or operator (admin of every tenant; operator only)."))


class ApiKeyPublic(BaseModel):
    """A key as listed: never the secret."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    scopes: list[str]
    tenant: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    """A key just created: the only response that carries the secret."""

    key: str


class ApiKeysPublic(BaseModel):
    """A list of keys."""

    data: list[ApiKeyPublic]
    count: int


class AliasUpdate(BaseModel):
    """Where an alias should point."""

    adapter_id: int = Field(ge=1, le=DB_INT_MAX)


class AliasPublic(BaseModel):
    """An alias and the adapter version it points at."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    tenant: str
    adapter_id: int
    lineage: str
    version: int
    revision: int
    updated_at: datetime


class AliasesPublic(BaseModel):
    """A list of aliases."""

    data: list[AliasPublic]
    count: int
