"""Dependencies shared by routers, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.state import AppState


def get_state(request: Request) -> AppState:
    """The app's long-lived state."""
    state: AppState = request.app.state.kmserve
    return state


StateDep = Annotated[AppState, Depends(get_state)]
