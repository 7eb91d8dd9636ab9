"""What the app holds for its lifetime: settings, database engine and session factory."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import make_engine, make_session_factory, migrate


@dataclass
class AppState:
    """Long-lived collaborators built once at start-up."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def start(cls, settings: Settings) -> AppState:
        """Connect and migrate (`alembic upgrade head`) before serving."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url, pool_size=settings.db_pool_size)
        migrate(engine)
        return cls(settings=settings, engine=engine, sessions=make_session_factory(engine))

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
