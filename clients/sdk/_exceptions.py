"""Errors raised by the kmserve SDK.

Every error derives from `KmError`::

    KmError
    ├── APIError(status, code, message)        the server answered with an error body
    │   ├── AuthenticationError                 401: missing or invalid API key
    │   ├── PermissionDeniedError               403: the key lacks the scope
    │   ├── NotFoundError                       404
    │   ├── ConflictError                       409
    │   ├── PayloadTooLargeError                413
    │   ├── UnsupportedMediaTypeError           415
    │   ├── UnprocessableError                  422: invalid body or parameters
    │   ├── RateLimitError                      429
    │   └── ServerError                         5xx
    │       └── ServiceUnavailableError         503
    ├── ConnectionError                         the server could not be reached
    └── TimeoutError                            no answer within the timeout

`message` is the server's own message (what to do about it); `code` its snake_case error code.
httpx errors are translated in one place, `translate_transport_error`, and chained (`raise ... from exc`).
"""

from __future__ import annotations

from typing import Any

import httpx


class KmError(Exception):
    """Base class of every error the SDK raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIError(KmError):
    """The server refused the request: HTTP `status`, error `code` and the server's `message`."""

    def __init__(self, message: str, *, status: int, code: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class AuthenticationError(APIError):
    """401: the API key is missing or invalid."""


class PermissionDeniedError(APIError):
    """403: the API key lacks the scope the route needs."""


class NotFoundError(APIError):
    """404: no such resource (or not the tenant's)."""


class ConflictError(APIError):
    """409: the resource's state forbids the operation."""


class PayloadTooLargeError(APIError):
    """413: the upload exceeds the server's limit."""


class UnsupportedMediaTypeError(APIError):
    """415: the file type is not accepted."""


class UnprocessableError(APIError):
    """422: the body or parameters are invalid."""


class RateLimitError(APIError):
    """429: too many requests; retry later."""


class ServerError(APIError):
    """5xx: the server failed."""


class ServiceUnavailableError(ServerError):
    """503: the server is not ready or overloaded; retry later."""


class ConnectionError(KmError):
    """The server could not be reached (refused, reset, DNS)."""


class TimeoutError(KmError):
    """The server did not answer within the timeout."""


STATUS_ERRORS: dict[int, type[APIError]] = {
    401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError, 409: ConflictError,
    413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: UnprocessableError, 429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_for_status(status: int, code: str, message: str, body: Any = None) -> APIError:
    """The exception for an error response of `status`."""
    cls = STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(message, status=status, code=code, body=body)


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response, carrying the server's `{"error": {"code", "message"}}`."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = str(error.get("code", "http_error")), str(error.get("message", ""))
    else:
        code, message = "http_error", response.text or response.reason_phrase
    return error_for_status(response.status_code, code, message, body)


def translate_transport_error(exc: httpx.TransportError) -> KmError:
    """The SDK's error for an httpx transport failure (the one place httpx errors are translated)."""
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(f"the server did not answer in time: {exc}")
    return ConnectionError(f"could not reach the server: {exc}")
