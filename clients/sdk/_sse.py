"""Parsing server-sent events from the lines of a `text/event-stream` body."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event: its `event:` name (default `message`), `id:` and the JSON of its `data:`."""

    event: str
    data: Any
    id: str | None = None


@dataclass
class EventParser:
    """Feed lines one by one; a blank line completes an event, which `feed` returns."""

    _event: str = "message"
    _id: str | None = None
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> ServerEvent | None:
        """Take one line (without its newline); the completed event at a blank line, else None."""
        if not line:
            return self._complete()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        elif name == "data":
            self._data.append(value)
        return None

    def _complete(self) -> ServerEvent | None:
        if not self._data:
            self._event, self._id = "message", None
            return None
        event = ServerEvent(self._event, json.loads("\n".join(self._data)), self._id)
        self._event, self._id, self._data = "message", None, []
        return event
