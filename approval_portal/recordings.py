"""Recordings in the portal: a page with the asciinema player, the `.cast` file, live follow.

Who may see a recording: the account's admins (a superadmin: every account)
and the technician whose session it was; everyone else gets the same 404 as
for a session that does not exist. The file is looked up by session id in this
process's own `<data_dir>/recordings` (never by a path from the database), so
the portal must share that directory with the relay that recorded it.

`/recordings/{id}/cast?offset=N` answers the bytes from N up to the last
complete line (an asciicast event is one line), with `x-rly-next-offset` and
`x-rly-live` headers: static/recording.js polls it to follow a live session.
The player is the only script on the portal, loaded from static files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import PageViewer
from core.models import SshSession

router = APIRouter()
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_CHUNK = 4 * 1024 * 1024  # one poll answers at most this much


def _visible(portal: Portal, viewer: Viewer, session_id: str) -> SshSession | None:
    if not SESSION_ID.fullmatch(session_id):
        return None
    with portal.sessions() as session:
        row = session.get(SshSession, session_id)
    if row is None:
        return None
    if viewer.is_superadmin or row.user_id == viewer.user_id:
        return row
    if viewer.is_admin and row.account_id == viewer.account_id:
        return row
    return None


def cast_path(portal: Portal, session_id: str) -> Path:
    return portal.settings.data_dir / "recordings" / f"{session_id}.cast"


def _not_found(request: Request, portal: Portal) -> Response:
    return portal.message(request, "Not found", "There is no such recording.", status_code=404)


@router.get("/recordings/{session_id}")
def recording_page(
    request: Request, session_id: str, portal: PortalDep, viewer: PageViewer
) -> Response:
    row = _visible(portal, viewer, session_id)
    if row is None:
        return _not_found(request, portal)
    path = cast_path(portal, row.id)
    exists = path.is_file()
    return portal.render(
        request,
        "recording.html",
        {
            "row": row,
            "exists": exists,
            "size": path.stat().st_size if exists else 0,
            "live": row.ended_at is None,
            "cast_url": f"/recordings/{row.id}/cast",
        },
    )


@router.get("/recordings/{session_id}/cast")
def recording_cast(
    request: Request,
    session_id: str,
    portal: PortalDep,
    viewer: PageViewer,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    download: Annotated[int, Query(ge=0, le=1)] = 0,
) -> Response:
    row = _visible(portal, viewer, session_id)
    if row is None:
        return _not_found(request, portal)
    try:
        data = _read_lines(cast_path(portal, row.id), offset)
    except OSError:
        return _not_found(request, portal)
    live = row.ended_at is None
    headers = {"x-rly-next-offset": str(offset + len(data)), "x-rly-live": "1" if live else "0"}
    if download:
        headers["content-disposition"] = f'attachment; filename="{row.id}.cast"'
    return Response(data, media_type="application/x-asciicast", headers=headers)


def _read_lines(path: Path, offset: int) -> bytes:
    """The bytes from `offset` up to the last complete line (a line being written waits)."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if offset >= size:
            return b""
        handle.seek(offset)
        data = handle.read(min(size - offset, MAX_CHUNK))
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else b""
