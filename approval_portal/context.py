"""What every portal request needs: settings, database, hub, templates, limits.

Built once by `create_app` and reached through `PortalDep`, so nothing is
created at import time and tests can pass their own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from approval_portal.pages import formatting
from approval_portal.ratelimit import SlidingWindow
from core import text
from core.config import Settings
from core.hub import Hub

HERE = Path(__file__).resolve().parent


@dataclass
class Portal:
    settings: Settings
    sessions: sessionmaker[Session]
    hub: Hub
    templates: Jinja2Templates
    user_limit: SlidingWindow
    source_limit: SlidingWindow
    clock: Callable[[], float]

    @property
    def secure(self) -> bool:
        """Cookies get Secure (and the __Host- prefix) when the public URL is https."""
        return self.settings.http.public_url.lower().startswith("https://")

    def render(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any] | None = None,
        *,
        status_code: int = 200,
    ) -> HTMLResponse:
        """Render a template; the viewer (if any) is picked up from request.state."""
        values = {"viewer": getattr(request.state, "viewer", None), **(context or {})}
        return self.templates.TemplateResponse(request, name, values, status_code=status_code)

    def message(self, request: Request, title: str, text: str, *, status_code: int) -> HTMLResponse:
        """A plain page with one sentence: errors, gone tokens, database trouble."""
        return self.render(
            request, "message.html", {"title": title, "text": text}, status_code=status_code
        )


def _format_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def make_templates() -> Jinja2Templates:
    """Jinja2 with autoescape forced on for every template, whatever its name, and every
    `{{ }}` output passed through core.text.printable first (stored text never reaches a
    page with its control characters raw)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=text.finalize,
    )
    env.filters["utc"] = _format_time
    env.filters.update(formatting.FILTERS)  # short/exact/ago/since/bytes (pages/formatting.py)
    return Jinja2Templates(env=env)


def make_portal(
    settings: Settings,
    sessions: sessionmaker[Session],
    hub: Hub,
    clock: Callable[[], float] = time.time,
) -> Portal:
    window = settings.portal.login_window
    return Portal(
        settings=settings,
        sessions=sessions,
        hub=hub,
        templates=make_templates(),
        user_limit=SlidingWindow(settings.portal.login_attempts_per_user, window),
        source_limit=SlidingWindow(settings.portal.login_attempts_per_source, window),
        clock=clock,
    )


def get_portal(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


PortalDep = Annotated[Portal, Depends(get_portal)]
