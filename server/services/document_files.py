"""What an upload may be: a .txt, .md or .pdf whose bytes match its name, within the size limit, not empty.

File names are only ever reduced to a display name (`source_name`); they never become a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from registry.errors import RegistryError
from server.errors import PayloadTooLargeError
from server.schemas.documents import TITLE_MAX, TrainOptions

MEDIA_TYPES = {".txt": "text/plain", ".md": "text/markdown", ".pdf": "application/pdf"}
PDF_MAGIC = b"%PDF-"
NAME_MAX = 255
# Text may hold a few stray control characters; more than this share of them means binary data.
MAX_CONTROL_SHARE = 0.05
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

MSG_EXTENSION = "{name!r} is not a supported document type; upload a .txt, .md or .pdf file."
MSG_NOT_TEXT = "{name} is not UTF-8 text (it holds binary data); upload plain UTF-8 text, Markdown or a PDF."
MSG_NOT_PDF = "{name} does not start with %PDF- so it is not a PDF; upload the PDF itself or its text as .txt."
MSG_CONTENT_TYPE = "send the document as multipart/form-data (field 'file') or as JSON {{title, text}}; got {got!r}."
MSG_EMPTY = "the document is empty; upload a file or text with content."
MSG_NO_FILE = "the multipart form has no file in field 'file'; send the document as a file named 'file'."
MSG_RANK = "train.rank {rank} is larger than this server's limit of {limit}; choose a smaller rank."


class UnsupportedMediaTypeError(RegistryError):
    """The upload is not a .txt, .md or .pdf, or its bytes do not match its name."""

    code = "unsupported_media_type"
    status = 415


class EmptyDocumentError(RegistryError):
    """The upload has no content."""

    code = "empty_document"
    status = 422

    def __init__(self) -> None:
        super().__init__(MSG_EMPTY)


class InvalidUploadError(RegistryError):
    """The upload is well formed HTTP but not a usable document request."""

    code = "invalid_upload"
    status = 422


@dataclass(frozen=True)
class DocumentUpload:
    """An upload as received: the raw bytes, the client's file name (None for JSON text) and the options."""

    data: bytes
    filename: str | None
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    train: TrainOptions = field(default_factory=TrainOptions)


@dataclass(frozen=True)
class CheckedDocument:
    """An upload that passed every check: its bytes, media type, blob suffix, display name and title."""

    data: bytes
    media_type: str
    suffix: str
    source_name: str | None
    title: str


def safe_basename(filename: str) -> str:
    """The last component of a client file name, without control characters; '' when nothing usable is left."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNPRINTABLE.sub("", name).strip()
    if set(name) <= {"."}:  # '', '.', '..'
        return ""
    return name[-NAME_MAX:]  # the end keeps the extension


def check_document(upload: DocumentUpload, limit: int) -> CheckedDocument:
    """The upload's bytes checked against the size limit, its type and emptiness; a typed error otherwise."""
    if len(upload.data) > limit:
        raise PayloadTooLargeError(limit, "document")
    if upload.filename is None:
        check_text(upload.data, "the text")
        return CheckedDocument(upload.data, MEDIA_TYPES[".txt"], ".txt", None, upload.title or "untitled")
    name = safe_basename(upload.filename)
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in MEDIA_TYPES:
        raise UnsupportedMediaTypeError(MSG_EXTENSION.format(name=name or upload.filename))
    if not upload.data:
        raise EmptyDocumentError()
    if suffix == ".pdf":
        check_pdf(upload.data, f"file {name!r}")
    else:
        check_text(upload.data, f"file {name!r}")
    title = upload.title or PurePosixPath(name).stem or name
    return CheckedDocument(upload.data, MEDIA_TYPES[suffix], suffix, name, title[:TITLE_MAX])


def check_text(data: bytes, name: str) -> None:
    """UTF-8 text with no NUL and few control characters, and not blank."""
    if b"\x00" in data:
        raise UnsupportedMediaTypeError(MSG_NOT_TEXT.format(name=name))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedMediaTypeError(MSG_NOT_TEXT.format(name=name)) from None
    if not text.strip():
        raise EmptyDocumentError()
    if len(_CONTROL.findall(text)) > MAX_CONTROL_SHARE * len(text):
        raise UnsupportedMediaTypeError(MSG_NOT_TEXT.format(name=name))


def check_pdf(data: bytes, name: str) -> None:
    """A PDF starts with its magic bytes."""
    if not data.startswith(PDF_MAGIC):
        raise UnsupportedMediaTypeError(MSG_NOT_PDF.format(name=name))


def check_train(train: TrainOptions, max_rank: int) -> None:
    """Training options this server accepts (the rank within `max_adapter_rank`)."""
    if train.rank is not None and train.rank > max_rank:
        raise InvalidUploadError(MSG_RANK.format(rank=train.rank, limit=max_rank))
