"""The operations pages: dashboard, devices, live sessions, enrollment tokens, users, relays.

One router per page family; approval_portal.app includes `routers()`.
"""

from __future__ import annotations

from fastapi import APIRouter


def routers() -> list[APIRouter]:
    from approval_portal.pages import dashboard, devices, relays, sessions, tokens, users

    return [
        dashboard.router,
        devices.router,
        sessions.router,
        tokens.router,
        users.router,
        relays.router,
    ]
