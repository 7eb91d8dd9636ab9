"""A real uvicorn server on a free loopback port, running the kmserve app in a background thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from evals.platform import free_port
from evals.platform import serve_in_thread as serve

if TYPE_CHECKING:
    import openai
    from fastapi import FastAPI

    from server.state import AppState

__all__ = ["free_port", "live_app", "openai_client", "serve"]


@contextmanager
def live_app(data_dir: Path, model_dir: Path) -> Iterator[tuple[FastAPI, str]]:
    """The API app serving the tiny model as `kmserve-tiny` from `data_dir`, live on loopback: (app, url)."""
    from registry.config import Settings
    from server.app import create_app

    app = create_app(Settings(data_dir=data_dir, base_model=str(model_dir), model_name="kmserve-tiny"))
    with serve(app) as url:
        yield app, url


def openai_client(url: str, state: AppState) -> openai.OpenAI:
    """The official OpenAI client on the server's /v1 routes with the bootstrap admin key."""
    import openai

    key = state.settings.admin_key_file.read_text().strip()
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
