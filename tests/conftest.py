"""Database fixtures: every registry test runs on SQLite and on PostgreSQL, each test rolled back.

PostgreSQL tests get a fresh schema per test run (dropped at the end). They skip when the server is unreachable,
except under CI=true where an unreachable PostgreSQL fails the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import make_engine, migrate
from server.state import AppState

POSTGRES_URL = os.environ.get("KMSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _postgres_available() -> str | None:
    try:
        engine = create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # any failure to reach the server means the same: no PostgreSQL here
        return f"PostgreSQL at {POSTGRES_URL} unreachable: {exc}"
    return None


def new_postgres_schema_url() -> tuple[str, str]:
    """Create an empty schema and return (url whose search_path is that schema, schema name)."""
    reason = _postgres_available()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL: {reason}")
        pytest.skip(reason)
    schema = f"kmtest_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}", schema


def drop_postgres_schema(schema: str) -> None:
    """Drop a schema made by `new_postgres_schema_url`."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'registry.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_engine() -> Iterator[Engine]:
    url, schema = new_postgres_schema_url()
    engine = make_engine(url)
    migrate(engine)
    yield engine
    engine.dispose()
    drop_postgres_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_engine(request: pytest.FixtureRequest) -> Engine:
    """A migrated engine: the test runs once per database."""
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture
def session_factory(db_engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Sessions bound to one outer transaction that is rolled back after the test; commits become savepoints."""
    connection = db_engine.connect()
    outer = connection.begin()
    factory = sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield factory
    outer.rollback()
    connection.close()


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session inside the rolled-back test transaction."""
    with session_factory() as s:
        yield s


@pytest.fixture
def fresh_db_url(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated database whose commits are real (for multi-process tests); param 'sqlite' or 'postgres'."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fresh') / 'fresh.db'}"
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        yield url
        return
    url, schema = new_postgres_schema_url()
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    drop_postgres_schema(schema)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The platform's default tiny model, built once per test session."""
    from engines.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture
def app_settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """Settings of an embedded server in a fresh data dir, serving the shared tiny model."""
    return Settings(data_dir=tmp_path / "data", base_model=str(tiny_model_dir), model_name="kmserve-tiny")


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    """The real app (migrated, admin key written, tiny model loaded) behind an in-process client."""
    from server.app import create_app

    with TestClient(create_app(app_settings)) as test_client:
        yield test_client


@pytest.fixture
def state(client: TestClient) -> AppState:
    """The running app's state (database, store, queue, engine)."""
    app_state: AppState = client.app.state.kmserve  # type: ignore[attr-defined]
    return app_state
