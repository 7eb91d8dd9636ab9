"""The platform an evaluation runs against: a running server by URL, or an embedded one started on loopback.

The embedded platform is the same process layout `kmserve up` runs (API server + trainer worker thread sharing one
engine), on a free loopback port with a fresh data directory, so an evaluation exercises upload, jobs, registry and
queries exactly as a user would, over HTTP.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from registry.config import Settings

MSG_NOT_STARTED = "the server did not start on port {port} within {timeout} s"


@dataclass(frozen=True)
class PlatformAddress:
    """Where the platform listens and the key to use (admin scope: evaluations train KEs and move aliases)."""

    url: str
    api_key: str | None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: FastAPI, *, timeout: float = 60.0) -> Iterator[str]:
    """Run `app` with uvicorn on a loopback port in a background thread until the block ends; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(MSG_NOT_STARTED.format(port=port, timeout=timeout))
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextmanager
def embedded_platform(settings: Settings) -> Iterator[PlatformAddress]:
    """Server + worker thread on loopback for `settings` (its data dir holds everything); yields its address."""
    from clients.cli import embedded_app
    from server.bootstrap import ensure_admin_key
    from server.state import AppState

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    api_key = None
    if settings.auth == "on":
        state = AppState.start(settings)
        try:
            ensure_admin_key(state.sessions, settings.admin_key_file)
        finally:
            state.engine.dispose()
        api_key = settings.admin_key_file.read_text().strip()
    with serve_in_thread(embedded_app(settings), timeout=300.0) as url:
        yield PlatformAddress(url, api_key)
