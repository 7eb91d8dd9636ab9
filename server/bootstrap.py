"""First-start work: migrate the database and make sure an operator key exists (written to an owner-only file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from registry.api_keys import Scope, count_operator_keys, create_api_key
from registry.db import transaction

log = logging.getLogger(__name__)
FIRST_KEY_NAME = "admin (first start)"


def ensure_admin_key(sessions: sessionmaker[Session], key_file: Path) -> str | None:
    """Create the first admin key when no operator key is active, write it to `key_file` (mode 0600), return it.

    It is an operator key: admin of every tenant, and the only kind that can create keys for other tenants. A
    database from before operator keys gets one too (its old admin key keeps working, as its tenant's admin).
    """
    with transaction(sessions) as session:
        if count_operator_keys(session) > 0:
            return None
        _, plaintext = create_api_key(session, FIRST_KEY_NAME, [Scope.OPERATOR.value])
        write_secret(key_file, plaintext)
    log.info("created the first admin key; it is in %s", key_file)
    return plaintext


def write_secret(path: Path, secret: str) -> None:
    """Write a secret to a file only its owner can read, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
