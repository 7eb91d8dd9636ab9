"""One place that turns errors into the API's JSON shape: {"error": {"code", "message"}}."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.db import database_unavailable
from registry.errors import RegistryError

log = logging.getLogger(__name__)

MSG_INTERNAL = "internal error; the server logged the details. Retry, and report it if it persists."
MSG_VALIDATION = "request body or parameters are invalid: {detail}"
MSG_UNSTORABLE = (
    "a value in the request cannot be stored or looked up ({detail}); send text without NUL characters, "
    "within its length limit, and integers within 64 bits."
)
MSG_TOO_LARGE = "the {what} is larger than the upload limit of {limit} bytes (KMSERVE_MAX_UPLOAD_BYTES); send less."
# Multipart framing and form fields around the files of an upload.
MULTIPART_SLACK_BYTES = 64 * 1024


class PayloadTooLargeError(RegistryError):
    """An upload (document, adapter, or any request body) exceeds `max_upload_bytes`."""

    code = "payload_too_large"
    status = 413

    def __init__(self, limit: int, what: str = "upload") -> None:
        super().__init__(MSG_TOO_LARGE.format(what=what, limit=limit), limit=limit)


class RetryLaterError(RegistryError):
    """A refusal the client may retry after `retry_after` seconds; the response carries a Retry-After header."""

    code = "retry_later"
    status = 429

    def __init__(self, message: str, retry_after: int, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = max(1, retry_after)


def error_response(exc: RegistryError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response of a domain error (with Retry-After when the refusal is temporary)."""
    merged = dict(headers or {})
    if isinstance(exc, RetryLaterError):
        merged["Retry-After"] = str(exc.retry_after)
    return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=merged or None)


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    """The JSON body of every error response."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def _http_code(status: int) -> str:
    return {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
            422: "validation_error", 429: "rate_limited", 503: "unavailable"}.get(status, "http_error")


async def _registry_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RegistryError)
    return error_response(exc)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(error_body(_http_code(exc.status_code), str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse(error_body("validation_error", MSG_VALIDATION.format(detail=detail)), status_code=422)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal_error", MSG_INTERNAL), status_code=500)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, DataError):
        # The database refused a value of the request (NUL in text, too long, out of range): a client error.
        detail = str(exc.orig).strip().splitlines()[0][:200] if str(exc.orig).strip() else type(exc.orig).__name__
        log.info("database refused a request value: %s", detail)
        return JSONResponse(error_body("invalid_value", MSG_UNSTORABLE.format(detail=detail)), status_code=422)
    # A lost or refused connection is the database's state, not a bug: 503, and pre-ping heals the pool.
    error = database_unavailable(exc)
    if error is None:
        return await _unexpected(request, exc)
    log.warning("database unavailable: %s", exc)
    return JSONResponse(error_body(error.code, error.message), status_code=error.status, headers={"Retry-After": "1"})


def install_body_limit(app: FastAPI, limit: int) -> None:
    """Refuse, before reading it, any request whose declared body is larger than the upload limit allows.

    Routes that take uploads also count the bytes as they arrive (a chunked body declares no length).
    """

    @app.middleware("http")
    async def _limit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK_BYTES:
            error = PayloadTooLargeError(limit, "request body")
            return JSONResponse(error_body(error.code, error.message), status_code=error.status)
        return await call_next(request)


def install_error_handlers(app: FastAPI) -> None:
    """Map domain, HTTP, validation and unexpected errors to the JSON error shape."""
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
