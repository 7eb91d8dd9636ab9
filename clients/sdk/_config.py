"""Where the SDK finds the server and its API key: arguments first, then the environment, then the admin key file."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = ".kmserve"
ADMIN_KEY_NAME = "admin.key"
URL_ENV, KEY_ENV, DATA_DIR_ENV = "KMSERVE_URL", "KMSERVE_API_KEY", "KMSERVE_DATA_DIR"


def resolve_base_url(base_url: str | None) -> str:
    """`base_url`, else KMSERVE_URL, else http://127.0.0.1:8000."""
    return (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def admin_key_file() -> Path:
    """The admin key file of a local server: KMSERVE_DATA_DIR/admin.key (default ./.kmserve/admin.key)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR) / ADMIN_KEY_NAME


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else KMSERVE_API_KEY, else the local admin key file's content, else None (auth off)."""
    if api_key:
        return api_key
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    path = admin_key_file()
    return path.read_text().strip() or None if path.is_file() else None
