"""Adapter uploads before anything is stored: where the version goes (lineage, alias) and its files staged on disk.

An upload names its two files either as the form fields `adapter_config` and `adapter_model`, or as a `files` list
whose file names are `adapter_config.json` and `adapter_model.safetensors`. Pickle weights are refused by name
before a byte is written; other files (the README.md PEFT writes) are ignored; the total size is capped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from registry.adapter_files import CONFIG_NAME, WEIGHTS_NAME, refuse_pickles
from registry.adapters import km_lineage
from registry.errors import RegistryError
from server.errors import PayloadTooLargeError
from server.schemas.adapters import AdapterUploadKind

COPY_CHUNK_BYTES = 1 << 20
# `alias` values that mean "set no alias" (for km uploads, whose alias is otherwise km:<document_id>).
NO_ALIAS = frozenset({"false", "none"})
# Lineages and aliases appear in URLs and in model names ("km:1+ke:name"): no '/', no '+', no spaces.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")

MSG_MISSING_FILE = (
    "the upload lacks {names}; send the files adapter_config (adapter_config.json) and adapter_model "
    "(adapter_model.safetensors), or both in a `files` list under those names."
)
MSG_DUPLICATE_FILE = "{name} was sent more than once; send each file once."
MSG_KM_NEEDS_DOCUMENT = "a km adapter needs document_id: the document whose knowledge module it is."
MSG_LINEAGE_REQUIRED = "a {kind} adapter needs a lineage, e.g. '{kind}:<name>'."
MSG_BAD_NAME = "{field} {value!r} must be 1-255 letters, digits, '.', '_', ':' or '-', starting with a letter or digit."


class InvalidUploadError(RegistryError):
    """The upload form is incomplete or inconsistent (missing file, km without a document, bad lineage)."""

    code = "invalid_upload"
    status = 422


@dataclass(frozen=True)
class UploadPart:
    """One uploaded file: the adapter file it stands for, the name the client gave it, and its content."""

    name: str
    filename: str
    stream: BinaryIO


@dataclass(frozen=True)
class UploadTarget:
    """Where an uploaded adapter is registered: its kind, lineage, document and the alias to point at it."""

    kind: AdapterUploadKind
    lineage: str
    document_id: int | None
    alias: str | None


def upload_target(
    kind: AdapterUploadKind, *, lineage: str | None, document_id: int | None, alias: str | None
) -> UploadTarget:
    """Check the form fields and fill in the km defaults (lineage and alias `km:<document_id>`)."""
    is_km = kind is AdapterUploadKind.KM
    if is_km and document_id is None:
        raise InvalidUploadError(MSG_KM_NEEDS_DOCUMENT)
    default = km_lineage(document_id) if is_km and document_id is not None else None
    lineage = lineage or default
    if lineage is None:
        raise InvalidUploadError(MSG_LINEAGE_REQUIRED.format(kind=kind.value))
    _check_name("lineage", lineage)
    chosen = default if alias is None else (None if alias.strip().lower() in NO_ALIAS else alias.strip())
    if chosen is not None:
        _check_name("alias", chosen)
    return UploadTarget(kind=kind, lineage=lineage, document_id=document_id, alias=chosen)


def _check_name(field: str, value: str) -> None:
    if not NAME_RE.match(value):
        raise InvalidUploadError(MSG_BAD_NAME.format(field=field, value=value))


def stage_upload(parts: Sequence[UploadPart], directory: Path, *, limit: int) -> None:
    """Write the config and weights into `directory` (pickles refused, total size capped at `limit` bytes)."""
    refuse_pickles(_names(parts))
    budget = limit
    for part in _required(parts):
        budget -= _copy(part, directory / part.name, budget, limit)


def _names(parts: Iterable[UploadPart]) -> Iterable[str]:
    for part in parts:
        yield part.name
        yield part.filename


def _required(parts: Sequence[UploadPart]) -> list[UploadPart]:
    found: dict[str, UploadPart] = {}
    for part in parts:
        if part.name in found and part.name in (CONFIG_NAME, WEIGHTS_NAME):
            raise InvalidUploadError(MSG_DUPLICATE_FILE.format(name=part.name))
        found.setdefault(part.name, part)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if name not in found]
    if missing:
        raise InvalidUploadError(MSG_MISSING_FILE.format(names=" and ".join(missing)))
    return [found[CONFIG_NAME], found[WEIGHTS_NAME]]


def _copy(part: UploadPart, target: Path, budget: int, limit: int) -> int:
    written = 0
    with target.open("wb") as out:
        while chunk := part.stream.read(COPY_CHUNK_BYTES):
            written += len(chunk)
            if written > budget:
                raise PayloadTooLargeError(limit, "adapter")
            out.write(chunk)
    return written
