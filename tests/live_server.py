"""A real uvicorn server on a free loopback port, running the kmserve app in a background thread."""

from __future__ import annotations

from evals.platform import free_port
from evals.platform import serve_in_thread as serve

__all__ = ["free_port", "serve"]
