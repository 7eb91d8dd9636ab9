"""Reading a document upload from a request, never more than the size limit allows: JSON text or a multipart file.

The declared Content-Length is checked before anything is read, and the bytes are counted while they arrive, so a
client that sends more than it declared (or declares nothing) is cut off at the limit as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from server.errors import PayloadTooLargeError
from server.schemas.documents import DocumentCreate, DocumentForm, TrainOptions
from server.services.document_files import (
    MSG_CONTENT_TYPE,
    MSG_NO_FILE,
    DocumentUpload,
    InvalidUploadError,
    UnsupportedMediaTypeError,
)

# Room for multipart headers and the form fields around the file.
FORM_OVERHEAD_BYTES = 64 * 1024
# JSON spells some characters in several bytes (json.dumps writes an emoji as two \uXXXX escapes: 12 bytes for 4).
JSON_EXPANSION = 3
READ_CHUNK = 64 * 1024
FORM_FIELDS = ("title", "metadata", "train")


async def read_document_upload(request: Request, limit: int) -> DocumentUpload:
    """The upload in the request body, JSON or multipart; 413 past `limit`, 415 for another content type."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/json":
        return await _from_json(request, limit)
    if content_type == "multipart/form-data":
        return await _from_form(request, limit)
    raise UnsupportedMediaTypeError(MSG_CONTENT_TYPE.format(got=content_type or "no content type"))


def bounded_request(request: Request, cap: int, limit: int) -> Request:
    """The request with a body that raises PayloadTooLargeError(limit) once more than `cap` bytes arrived."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLargeError(limit, "document")
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > cap:
                raise PayloadTooLargeError(limit, "document")
        return message

    return Request(request.scope, receive)


async def _from_json(request: Request, limit: int) -> DocumentUpload:
    body = await bounded_request(request, limit * JSON_EXPANSION + FORM_OVERHEAD_BYTES, limit).body()
    try:
        document = DocumentCreate.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None
    return DocumentUpload(document.text.encode("utf-8"), None, document.title, document.metadata, document.train)


async def _from_form(request: Request, limit: int) -> DocumentUpload:
    bounded = bounded_request(request, limit + FORM_OVERHEAD_BYTES, limit)
    async with bounded.form(max_files=1, max_fields=len(FORM_FIELDS)) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InvalidUploadError(MSG_NO_FILE)
        data = await read_bounded(file, limit)
        fields = _form_fields(form)
    train = fields.train or TrainOptions()
    return DocumentUpload(data, file.filename or "", fields.title, fields.metadata or {}, train)


def _form_fields(form: FormData) -> DocumentForm:
    values = {name: value for name in FORM_FIELDS if isinstance(value := form.get(name), str)}
    try:
        return DocumentForm.model_validate(values)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


async def read_bounded(file: UploadFile, limit: int) -> bytes:
    """The file's bytes; PayloadTooLargeError as soon as they pass `limit`."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await file.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(limit, "document")
        chunks.append(chunk)
    return b"".join(chunks)


def validation_error(errors: Sequence[Any]) -> RequestValidationError:
    """A 422 in the API's error shape, located in the request body."""
    return RequestValidationError([{**error, "loc": ("body", *error.get("loc", ()))} for error in errors])
