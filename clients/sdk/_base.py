"""What the sync and async clients share: settings, retry policy, request arguments and response reading."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from clients.sdk import _models as m
from clients.sdk._config import resolve_api_key, resolve_base_url
from clients.sdk._endpoints import Call
from clients.sdk._exceptions import APIError, error_for_status, error_from_response
from clients.sdk._sse import ServerEvent

T = TypeVar("T")
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 2
RETRY_STATUSES = frozenset({429, 503})
# Connection failures worth another try; a timeout is not retried (the server may still be working on it).
RETRY_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
MAX_RETRY_AFTER = 30.0
USER_AGENT = "kmserve-python"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for idempotent requests: `backoff * 2**attempt`, at most `max_delay`."""

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (a Retry-After header wins, capped)."""
        retry_after = response.headers.get("retry-after", "") if response is not None else ""
        if retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), MAX_RETRY_AFTER)
        base: float = min(self.backoff * 2**attempt, self.max_delay)
        jitter: float = 0.5 + random.random() / 2  # spreads clients that failed together
        return base * jitter

    def retry_response(self, call: Call[Any], response: httpx.Response, attempt: int) -> bool:
        """Whether to retry after this response."""
        return call.idempotent and attempt < self.max_retries and response.status_code in RETRY_STATUSES

    def retry_error(self, call: Call[Any], exc: httpx.TransportError, attempt: int) -> bool:
        """Whether to retry after this transport error."""
        return call.idempotent and attempt < self.max_retries and isinstance(exc, RETRY_ERRORS)


def client_settings(base_url: str | None, api_key: str | None, timeout: float | None) -> dict[str, Any]:
    """Keyword arguments of an httpx client for these settings."""
    key = resolve_api_key(api_key)
    headers = {"User-Agent": USER_AGENT, **({"Authorization": f"Bearer {key}"} if key else {})}
    return {"base_url": resolve_base_url(base_url), "headers": headers,
            "timeout": DEFAULT_TIMEOUT if timeout is None else timeout}


def request_args(call: Call[Any]) -> dict[str, Any]:
    """The arguments of `httpx.Client.request` for a call."""
    args: dict[str, Any] = {"params": call.params}
    if call.json is not None:
        args["json"] = call.json
    if call.files is not None:
        args["files"], args["data"] = call.files, call.data
    return args


def read_response(call: Call[T], response: httpx.Response) -> T:
    """The call's result, or the API error the response carries."""
    if response.is_error:
        raise error_from_response(response)
    return call.parse(response)


def job_item(event: ServerEvent) -> m.JobEvent | m.Job:
    """A job stream item: the final `Job` for the `end` event, else the `JobEvent`."""
    if event.event == "end":
        return m.Job.model_validate(event.data)
    return m.JobEvent.model_validate(event.data)


def query_item(event: ServerEvent) -> str | m.QueryResult:
    """A query stream item: a text delta, the final result, or the error the stream reported (raised)."""
    if event.event == "delta":
        return str(event.data.get("delta", ""))
    if event.event == "done":
        return m.QueryResult.model_validate(event.data)
    error = event.data.get("error", {}) if isinstance(event.data, dict) else {}
    raise stream_error(error)


def stream_error(error: dict[str, Any]) -> APIError:
    """The error a stream reported after its 200 status line (status 200, the server's code and message)."""
    return error_for_status(200, str(error.get("code", "stream_error")), str(error.get("message", "")), error)
