"""The `kmserve` command line: run the platform (up, serve, worker, migrate), manage its storage (gc), and use a
running server (docs, ask, jobs, adapters, keys: see `clients.cli_remote`).

Server-side commands import the server lazily, so `kmserve --help` stays fast and the HTTP-only commands never
load torch. Exit codes: 0 ok, 1 the operation was refused (message printed), 2 usage error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from clients import cli_bench, cli_eval
from clients.cli_remote import RemoteOptions, register

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from fastapi import FastAPI

    from registry.config import Settings
    from trainer_worker.handlers import HandlerTable
    from trainer_worker.worker import WorkerConfig

app = typer.Typer(name="kmserve", help="kmserve: knowledge modules, trained and served.", no_args_is_help=True,
                  add_completion=False)
console = Console()
err_console = Console(stderr=True)

HostOpt = Annotated[str | None, typer.Option(help="Bind address (default: KMSERVE_HOST or 127.0.0.1).")]
PortOpt = Annotated[int | None, typer.Option(help="Port (default: KMSERVE_PORT or 8000).")]
KindsOpt = Annotated[str | None, typer.Option(help="Comma-separated job kinds to run, e.g. ingest,synthesize "
                                                   "(default: every kind).")]
OnceOpt = Annotated[bool, typer.Option("--once", help="Run the jobs claimable now, then exit instead of polling.")]
MaxJobsOpt = Annotated[int | None, typer.Option(min=1, help="Exit after running this many jobs.")]
PollOpt = Annotated[float, typer.Option(min=0.01, help="Seconds between polls of an idle queue (backs off to 15 s).")]
WorkerOpt = Annotated[bool, typer.Option("--worker/--no-worker",
                                         help="Run the trainer worker inside this process (a thread).")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Server URL (default: KMSERVE_URL or http://127.0.0.1:8000).")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", help=(
    "API key (default: KMSERVE_API_KEY, else the admin key file KMSERVE_DATA_DIR/admin.key)."))]
IDLE_POLL_MAX_SECONDS = 15.0


@app.callback()
def global_options(ctx: typer.Context, url: UrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """kmserve: knowledge modules, trained and served."""
    ctx.obj = RemoteOptions(url, api_key)


register(app)
cli_bench.register(app)
cli_eval.register(app)


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
    """Run the API server (migrates on start; SIGTERM drains requests in flight, then exits)."""
    _run_server(host, port)


@app.command()
def worker(kinds: KindsOpt = None, once: OnceOpt = False, max_jobs: MaxJobsOpt = None, poll: PollOpt = 1.0) -> None:
    """Run a trainer worker: claim jobs and run them; SIGTERM hands the running job back to the queue and exits."""
    from registry.config import get_settings
    from trainer_worker.worker import WorkerConfig, WorkerSetupError, build_worker, install_signal_handlers

    settings = get_settings()
    _configure_logging(settings.log_level)
    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else None
    config = WorkerConfig(kinds=kind_list, poll_seconds=poll, max_poll_seconds=max(poll, IDLE_POLL_MAX_SECONDS),
                          once=once, max_jobs=max_jobs)
    try:
        running = build_worker(settings, config=config)
    except WorkerSetupError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    install_signal_handlers(running)
    console.print(f"worker [bold]{running.worker_id}[/bold] running {', '.join(kind_list or ['every kind'])}")
    try:
        stats = running.run()
    finally:
        running.close()
    console.print(f"worker stopped after {stats.jobs} job(s): {stats.summary() or 'none'}")


@app.command()
def up(host: HostOpt = None, port: PortOpt = None, worker: WorkerOpt = True) -> None:
    """Run everything on this machine with the embedded default: migrate, bootstrap, serve, and run the worker."""
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
    _configure_logging(settings.log_level)
    _run_server(host, port, embedded_app(settings) if worker else None)


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


def embedded_app(
    settings: Settings, *, handlers: HandlerTable | None = None, config: WorkerConfig | None = None
) -> FastAPI:
    """The API app with a trainer worker thread that its lifespan starts after the server and stops before it.

    The worker borrows the server's generation engine and event loop, so this one process holds one copy of the
    model and alone owns the embedded database, index and store. At shutdown the worker finishes its step and
    releases its job while the engine is still up.
    """
    import asyncio
    from contextlib import asynccontextmanager

    from server.app import create_app
    from trainer_worker.engine_runtime import BorrowedEngineRuntime
    from trainer_worker.worker import WorkerThread, build_worker

    api = create_app(settings)
    serve_lifespan = api.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with serve_lifespan(app) as value:
            runtime = BorrowedEngineRuntime(asyncio.get_running_loop(), app.state.kmserve.require_generator)
            built = await asyncio.to_thread(build_worker, settings, handlers=handlers, config=config, runtime=runtime)
            thread = app.state.worker_thread = WorkerThread(built)
            thread.start()
            try:
                yield value
            finally:
                await asyncio.to_thread(thread.stop)

    api.router.lifespan_context = lifespan
    return api


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Alembic narrates every revision lookup at INFO; only its warnings matter to someone running the platform.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


def _run_server(host: str | None, port: int | None, api: FastAPI | None = None) -> None:
    """Serve until SIGTERM/Ctrl+C, then drain: new requests get 503 while those in flight finish (exit 0)."""
    from registry.config import get_settings
    from server.app import create_app
    from server.shutdown import run_draining

    settings = get_settings()
    bind_host, bind_port = host or settings.host, port or settings.port
    console.print(f"kmserve listening on [bold]http://{bind_host}:{bind_port}[/bold] (docs at /docs)")
    run_draining(api or create_app(settings), host=bind_host, port=bind_port, log_level=settings.log_level,
                 drain_seconds=settings.shutdown_drain_seconds)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
