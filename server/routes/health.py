"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sqlalchemy import text

from registry.db import current_revision
from server.auth import UnauthorizedError
from server.deps import StateDep
from server.errors import error_body
from server.services.admin_adapters import refresh_engine_metrics
from server.services.jobs import refresh_queue_metrics

router = APIRouter(tags=["health"])

MSG_METRICS_AUTH = "/metrics needs 'Authorization: Bearer <token>' with this server's KMSERVE_METRICS_TOKEN."


class HealthPublic(BaseModel):
    """Liveness answer."""

    status: str


class ReadyPublic(BaseModel):
    """Readiness answer: the database is reachable and migrated."""

    status: str
    database: str
    schema_revision: str | None


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """The process is up."""
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=ReadyPublic, responses={503: {"description": "database unreachable"}})
def readyz(state: StateDep) -> ReadyPublic | JSONResponse:
    """The process can serve: its database answers."""
    try:
        with state.engine.connect() as conn:
            conn.execute(text("select 1"))
        revision = current_revision(state.engine)
    except Exception as exc:  # any database failure means the same: not ready
        return JSONResponse(error_body("unavailable", f"database unreachable: {type(exc).__name__}"), status_code=503)
    return ReadyPublic(status="ready", database=state.engine.dialect.name, schema_revision=revision)


def _check_metrics_token(request: Request, state: StateDep) -> None:
    token = state.settings.metrics_token
    if token is None:
        return
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.get_secret_value().encode()):
        raise UnauthorizedError(MSG_METRICS_AUTH)


@router.get("/metrics", response_class=Response, responses={401: {"description": "KMSERVE_METRICS_TOKEN not sent"}})
async def metrics(request: Request, state: StateDep) -> Response:
    """Prometheus metrics in text format (behind a bearer token when KMSERVE_METRICS_TOKEN is set)."""
    _check_metrics_token(request, state)
    collectors = request.app.state.metrics
    # Engine stats are read on the event loop (the adapter cache lives there); the queue count is SQL.
    refresh_engine_metrics(state, collectors)
    await asyncio.to_thread(refresh_queue_metrics, state, collectors)
    return Response(collectors.render(), media_type=CONTENT_TYPE_LATEST)
