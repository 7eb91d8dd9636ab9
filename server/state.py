"""What the app holds for its lifetime: settings, database, adapter store, job queue, generation engine, retrieval."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine as SqlEngine
from sqlalchemy.orm import Session, sessionmaker

from engines.default_model import default_model_id
from registry.config import Settings
from registry.db import make_engine, make_session_factory, migrate
from registry.queue import JobQueue
from registry.store import AdapterStore

if TYPE_CHECKING:
    from engines.base import Engine
    from engines.embedder import Embedder
    from registry.vector_index import VectorIndex



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
    # Retrieval: opened on the first RAG query or document delete, so a start-up loads neither.
    vector_index: VectorIndex | None = None
    embedder: Embedder | None = None
    _retrieval_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
        return self.settings.model_name or self.settings.base_model or default_model_id()

    @property
    def max_adapter_rank(self) -> int:
        """The largest LoRA rank this server accepts: KMSERVE_MAX_ADAPTER_RANK, and on vLLM no more than the rank
        its LoRA slots are reserved for (KMSERVE_VLLM_MAX_LORA_RANK), so an accepted adapter can be served."""
        from engines.base import select_engine

        limit = self.settings.max_adapter_rank
        return min(limit, self.settings.vllm_max_lora_rank) if select_engine(self.settings) == "vllm" else limit

    def require_generator(self) -> Engine:
        """The generation engine; EngineUnavailableError while it is not started."""
        if self.generator is None:
            from engines.errors import EngineUnavailableError

            raise EngineUnavailableError("generator", "it is not started on this server")
        return self.generator

    def require_vector_index(self) -> VectorIndex:
        """The process's shared vector index, opened on first use (IndexLockedError: another process holds it)."""
        with self._retrieval_lock:
            if self.vector_index is None:
                from registry.vector_index import VectorIndex

                self.vector_index = VectorIndex.open(self.settings)
            return self.vector_index

    def require_embedder(self) -> Embedder:
        """The process's shared embedder (its model loads on the first embedding)."""
        with self._retrieval_lock:
            if self.embedder is None:
                from engines.embedder import shared_embedder

                self.embedder = shared_embedder(self.settings)
            return self.embedder

    async def start_generator(self) -> None:
        """Load the base model into the configured engine."""
        import asyncio

        from engines.factory import create_engine

        self.generator = await asyncio.to_thread(create_engine, self.settings)

    async def close(self) -> None:
        """Stop the engine, release the vector index and database connections."""
        if self.generator is not None:
            await self.generator.close()
        if self.vector_index is not None:
            self.vector_index.close()
            self.vector_index = None
        self.engine.dispose()
