"""What the app holds for its lifetime: settings, database, adapter store, job queue and generation engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine as SqlEngine
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import make_engine, make_session_factory, migrate
from registry.queue import JobQueue
from registry.store import AdapterStore

if TYPE_CHECKING:
    from engines.base import Engine

DEFAULT_MODEL_ID = "kmserve-tiny"


@dataclass
class AppState:
    """Long-lived collaborators built once at start-up."""

    settings: Settings
    engine: SqlEngine
    sessions: sessionmaker[Session]
    store: AdapterStore
    queue: JobQueue
    generator: Engine | None = None
    # Verified local directories of adapters the generator holds, by registry id: reused while resident,
    # verified again through the store once evicted.
    verified_paths: dict[int, Path] = field(default_factory=dict)

    @classmethod
    def start(cls, settings: Settings) -> AppState:
        """Connect and migrate (`alembic upgrade head`) before serving."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url, pool_size=settings.db_pool_size)
        migrate(engine)
        sessions = make_session_factory(engine)
        return cls(settings=settings, engine=engine, sessions=sessions, store=AdapterStore.from_settings(settings),
                   queue=JobQueue.from_settings(sessions, settings))

    @property
    def base_model_id(self) -> str:
        """The id clients name the base model by (`model` in the OpenAI routes)."""
        return self.settings.model_name or self.settings.base_model or DEFAULT_MODEL_ID

    def require_generator(self) -> Engine:
        """The generation engine; EngineUnavailableError while it is not started."""
        if self.generator is None:
            from engines.errors import EngineUnavailableError

            raise EngineUnavailableError("generator", "it is not started on this server")
        return self.generator

    async def start_generator(self) -> None:
        """Load the base model into the configured engine."""
        import asyncio

        from engines.factory import create_engine

        self.generator = await asyncio.to_thread(create_engine, self.settings)

    async def close(self) -> None:
        """Stop the engine and release database connections."""
        if self.generator is not None:
            await self.generator.close()
        self.engine.dispose()
