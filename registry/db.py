"""Engines, sessions and migrations for SQLite (embedded) and PostgreSQL (scale-out)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import RegistryError

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option naming how a SQLite transaction begins; the job queue claims under IMMEDIATE so that
# two claimers serialize on the write lock instead of both reading the same queued row.
SQLITE_BEGIN = "sqlite_begin"
MSG_DB_UNAVAILABLE = "the database is unavailable (connection lost, refused or busy); retry in a few seconds."
# Raised by the driver when a connection dies, is refused or the server is shutting down (OperationalError), when
# a closed connection is used (InterfaceError), and by the pool when no connection frees up in time (TimeoutError).
CONNECTION_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)


class DatabaseUnavailableError(RegistryError):
    """The database could not be reached for this request; the next one gets a fresh connection (pre-ping)."""

    code = "database_unavailable"
    status = 503

    def __init__(self) -> None:
        super().__init__(MSG_DB_UNAVAILABLE)


# The DB-API (PEP 249) names of a driver's own connection errors, whatever module defines them.
DRIVER_CONNECTION_ERRORS = frozenset({"OperationalError", "InterfaceError"})


def database_unavailable(exc: BaseException) -> DatabaseUnavailableError | None:
    """The 503 error for a lost or refused database connection; None for any other database error (a bug).

    The whole chain counts: a connection that dies under the pool's pre-ping can surface as another error raised
    while cleaning up after the lost one (psycopg: "can't change 'autocommit' now" after "connection socket closed").
    """
    return DatabaseUnavailableError() if any(_connection_lost(e) for e in _chain(exc)) else None


def _connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, CONNECTION_ERRORS) or any(k.__name__ in DRIVER_CONNECTION_ERRORS for k in type(exc).__mro__)


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception, the driver error it wraps, and what caused it or was being handled when it was raised."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or any(current is e for e in seen):
            continue
        seen.append(current)
        pending.extend((getattr(current, "orig", None), current.__cause__, current.__context__))
    return seen


def is_sqlite(engine: Engine) -> bool:
    """True for a SQLite engine."""
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, pool_size: int = 5, **kwargs: Any) -> Engine:
    """An engine with pre-ping (survives a restarted PostgreSQL) and SQLite set up for concurrent processes."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, **kwargs)
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size * 2, **kwargs)


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN IMMEDIATE and SAVEPOINT work as written.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are handed to routers as plain data)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session


@contextmanager
def write_transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction that writes; on SQLite it holds the write lock from its first statement.

    Under SQLite's default BEGIN DEFERRED two writers could both read the same row before either writes, and a
    reader that another writer overtook fails with SQLITE_BUSY instead of waiting. Other dialects ignore the
    option: they lock rows with FOR UPDATE.
    """
    with transaction(factory) as session:
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
        yield session


def alembic_config(url: str | None = None) -> Any:
    """The Alembic config of the registry's migrations, pointed at `url`."""
    from alembic.config import Config

    here = Path(__file__).parent
    config = Config(str(here / "alembic.ini"))
    config.set_main_option("script_location", str(here / "migrations"))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to `revision` (`alembic upgrade head`) on the engine's database."""
    from alembic import command

    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head_revision() -> str:
    """The newest migration revision shipped with this code."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None when never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
