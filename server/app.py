"""The FastAPI application: built by `create_app(settings)`; migrates, bootstraps and loads the engine on start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from registry.config import Settings, get_settings
from server.bootstrap import ensure_admin_key
from server.errors import install_body_limit, install_error_handlers
from server.limits import install_limits
from server.metrics import ServerMetrics, install_metrics
from server.routes import admin_access, admin_adapters, documents, health, jobs, openai_compat, query
from server.services.adapters import AdapterService
from server.services.generation import GenerationService
from server.services.retrieval import RetrievalService
from server.state import AppState


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured kmserve app (settings from the environment when not given)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState.start(settings)
        if settings.auth == "on":
            ensure_admin_key(state.sessions, settings.admin_key_file)
        await state.start_generator()
        app.state.kmserve = state
        app.state.adapter_service = AdapterService(state)
        app.state.generation = GenerationService(state, app.state.adapter_service, app.state.metrics)
        app.state.retrieval = RetrievalService(state)
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="kmserve", version="0.1.0", lifespan=lifespan,
                  description="Knowledge modules: per-document LoRA adapters, trained and served.")
    app.state.metrics = ServerMetrics()
    install_error_handlers(app)
    # Innermost middleware: its refusals (429, 503, 504) are counted by the metrics around it, and a request's
    # deadline cancels only the route itself.
    install_limits(app, settings)
    install_metrics(app, app.state.metrics)
    install_body_limit(app, settings.max_upload_bytes)
    app.include_router(health.router)
    for module in (documents, jobs, query, openai_compat, admin_adapters, admin_access):
        app.include_router(module.router)
    return app
