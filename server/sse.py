"""Server-sent events: the wire format, and a polling stream with heartbeats that stops when the client leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from server.schemas.common import DB_INT_MAX

MEDIA_TYPE = "text/event-stream"
# No caching, and no buffering by reverse proxies (nginx honours X-Accel-Buffering), so events arrive as sent.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LAST_EVENT_ID = "last-event-id"

# One poll: the chunks to send now, and whether the stream is finished.
Poll = Callable[[], Awaitable[tuple[list[str], bool]]]
Disconnected = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class StreamSettings:
    """How often a polling stream looks for news, and how long it may stay silent before a heartbeat."""

    poll_seconds: float = 0.5
    heartbeat_seconds: float = 15.0


def get_stream_settings() -> StreamSettings:
    """The pacing of polling event streams (tests override this dependency to poll faster)."""
    return StreamSettings()


def format_event(data: object, *, event: str | None = None, event_id: str | int | None = None) -> str:
    """One event: optional `id:` and `event:` lines, then the data as one line of compact JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    head += f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def format_comment(text: str = "ping") -> str:
    """A comment line: clients ignore it, and it keeps proxies from closing an idle connection."""
    return f": {text}\n\n"


def resume_after(request: Request, after: int | None) -> int:
    """The last event id the client saw: its `Last-Event-ID` header (sent on reconnect), else `after`, else 0."""
    header = request.headers.get(LAST_EVENT_ID, "").strip()
    if header.isascii() and header.isdigit():
        return min(int(header), DB_INT_MAX)  # no event id is larger
    return max(after or 0, 0)


async def poll_stream(
    poll: Poll, is_disconnected: Disconnected, settings: StreamSettings, *, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[str]:
    """Call `poll` every `poll_seconds` and yield what it returns, until it says done or the client leaves."""
    last_sent = clock()
    while not await is_disconnected():
        chunks, done = await poll()
        for chunk in chunks:
            yield chunk
        if done:
            return
        if chunks:
            last_sent = clock()
        elif clock() - last_sent >= settings.heartbeat_seconds:
            yield format_comment()
            last_sent = clock()
        await asyncio.sleep(settings.poll_seconds)


def event_stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A `text/event-stream` response of already formatted events."""
    return StreamingResponse(events, media_type=MEDIA_TYPE, headers=SSE_HEADERS)
