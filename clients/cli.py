"""The `kmserve` command line: run the platform (up, serve, migrate) and manage its storage (gc).

Server-side commands import the server lazily, so `kmserve --help` stays fast and the HTTP-only commands never
load torch. Exit codes: 0 ok, 1 the operation was refused (message printed), 2 usage error.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(name="kmserve", help="kmserve: knowledge modules, trained and served.", no_args_is_help=True,
                  add_completion=False)
console = Console()
err_console = Console(stderr=True)

HostOpt = Annotated[str | None, typer.Option(help="Bind address (default: KMSERVE_HOST or 127.0.0.1).")]
PortOpt = Annotated[int | None, typer.Option(help="Port (default: KMSERVE_PORT or 8000).")]


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    from registry.config import get_settings
    from registry.db import current_revision, make_engine
    from registry.db import migrate as run_migrations

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    run_migrations(engine)
    console.print(f"database at revision [bold]{current_revision(engine)}[/bold] ({engine.url.render_as_string()})")
    engine.dispose()


@app.command()
def serve(host: HostOpt = None, port: PortOpt = None) -> None:
    """Run the API server (migrates on start)."""
    _run_server(host, port)


@app.command()
def up(host: HostOpt = None, port: PortOpt = None) -> None:
    """Run everything on this machine with the embedded default: migrate, bootstrap, serve."""
    from registry.config import get_settings
    from server.bootstrap import ensure_admin_key
    from server.state import AppState

    settings = get_settings()
    state = AppState.start(settings)
    if settings.auth == "on":
        created = ensure_admin_key(state.sessions, settings.admin_key_file)
        note = "created" if created else "kept"
        console.print(f"admin key ({note}): [bold]{settings.admin_key_file.resolve()}[/bold] (mode 0600)")
    else:
        console.print("[yellow]KMSERVE_AUTH=off: every request is allowed[/yellow]")
    state.engine.dispose()
    _run_server(host, port)


@app.command()
def gc(
    grace: Annotated[float | None, typer.Option(help="Keep unreferenced blobs younger than this many seconds.")] = None,
) -> None:
    """Remove adapter and blob files that no registry row references."""
    from registry.adapters import referenced_digests, referenced_uris
    from registry.config import get_settings
    from registry.db import make_engine, make_session_factory, transaction
    from registry.store import AdapterStore

    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_session_factory(engine)) as session:
        referenced = referenced_uris(session) | referenced_digests(session)
    engine.dispose()
    report = AdapterStore.from_settings(settings).gc(
        referenced, grace_seconds=settings.gc_grace_seconds if grace is None else grace
    )
    console.print(f"removed {report.adapters_removed} adapters, {report.blobs_removed} blobs, "
                  f"{report.temp_removed} temp dirs; freed {report.bytes_freed} bytes")


def _run_server(host: str | None, port: int | None) -> None:
    import uvicorn

    from registry.config import get_settings
    from server.app import create_app

    settings = get_settings()
    bind_host, bind_port = host or settings.host, port or settings.port
    console.print(f"kmserve listening on [bold]http://{bind_host}:{bind_port}[/bold] (docs at /docs)")
    uvicorn.run(create_app(settings), host=bind_host, port=bind_port, log_level=settings.log_level)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
