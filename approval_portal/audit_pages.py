"""The audit log for admins: filters, newest first, paging, export as CSV and JSON lines.

Filters arrive as GET parameters (so a filtered view is a link) and are checked
here: a bad one gives a 400 page with one sentence and reads nothing. Exports
use the same filters and stream every matching row in chain order with its
position and hashes, so a JSON-lines export can be checked against
`core.audit.canonical` outside rly. The CSV export prefixes cells that a
spreadsheet would run as a formula (=, +, -, @) with an apostrophe; the JSON
lines are the rows exactly.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AdminViewer
from core.models import AuditEvent
from core.validate import strip_controls

router = APIRouter()
PAGE_SIZE = 50
EXPORT_BATCH = 1000
Param = Annotated[str, Query(max_length=128)]
EXPORT_FIELDS = (
    "id",
    "seq",
    "at",
    "action",
    "actor",
    "account_id",
    "target",
    "detail",
    "source_ip",
    "prev_hash",
    "row_hash",
)


class BadFilter(ValueError):
    """A filter value the page cannot use; the message is one sentence."""


@dataclass(frozen=True)
class AuditFilter:
    actor: str = ""
    action: str = ""
    device: str = ""
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(cls, actor: str, action: str, device: str, since: str, until: str) -> AuditFilter:
        return cls(
            actor=_text(actor, "actor"),
            action=_text(action, "action"),
            device=_text(device, "device"),
            since=_when(since, "from"),
            until=_when(until, "until"),
        )

    def conditions(self, viewer: Viewer) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if not viewer.is_superadmin:
            where.append(AuditEvent.account_id == viewer.account_id)
        if self.actor:
            where.append(func.lower(AuditEvent.actor).contains(self.actor.lower(), autoescape=True))
        if self.action:
            where.append(AuditEvent.action.contains(self.action.lower(), autoescape=True))
        if self.device:
            where.append(
                or_(
                    AuditEvent.target.contains(self.device, autoescape=True),
                    AuditEvent.detail.contains(self.device, autoescape=True),
                )
            )
        if self.since is not None:
            where.append(AuditEvent.at >= self.since)
        if self.until is not None:
            where.append(AuditEvent.at < self.until)
        return where

    def query(self, **extra: str | int) -> str:
        values: dict[str, str | int] = {
            "actor": self.actor,
            "action": self.action,
            "device": self.device,
            "from": _form_time(self.since),
            "until": _form_time(self.until),
            **extra,
        }
        return urlencode({k: v for k, v in values.items() if v not in ("", None)})

    @property
    def active(self) -> bool:
        return any((self.actor, self.action, self.device, self.since, self.until))


def _text(value: str, name: str) -> str:
    value = value.strip()
    if value != strip_controls(value):
        raise BadFilter(f"The {name} filter must not contain control characters.")
    return value


def _when(value: str, name: str) -> datetime | None:
    """`YYYY-MM-DDTHH:MM` (a datetime-local field) or a date, read as UTC."""
    value = value.strip()
    if not value:
        return None
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise BadFilter(f"The {name} time must look like 2026-12-01T09:30 (UTC).")


def _form_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M") if value is not None else ""


def one_line_time(value: datetime) -> str:
    """The exact time; its cell is `white-space: nowrap` (static/console.css)."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _filter_from(actor: str, action: str, device: str, since: str, until: str) -> AuditFilter | str:
    try:
        return AuditFilter.parse(actor, action, device, since, until)
    except BadFilter as exc:
        return str(exc)


@router.get("/audit")
def audit_page(
    request: Request,
    portal: PortalDep,
    viewer: AdminViewer,
    actor: Param = "",
    action: Param = "",
    device: Param = "",
    since: Annotated[str, Query(alias="from", max_length=32)] = "",
    until: Annotated[str, Query(max_length=32)] = "",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> Response:
    filters = _filter_from(actor, action, device, since, until)
    if isinstance(filters, str):
        return portal.message(request, "Bad filter", filters, status_code=400)
    with portal.sessions() as session:
        rows, total = _page(session, filters, viewer, page)
    pages = max(1, -(-total // PAGE_SIZE))
    return portal.render(
        request,
        "audit.html",
        {
            "rows": rows,
            "filters": filters,
            "form_from": _form_time(filters.since),
            "form_until": _form_time(filters.until),
            "total": total,
            "page": page,
            "pages": pages,
            "prev_link": f"/audit?{filters.query(page=page - 1)}" if page > 1 else "",
            "next_link": f"/audit?{filters.query(page=page + 1)}" if page < pages else "",
            "csv_link": f"/audit/export.csv?{filters.query()}",
            "jsonl_link": f"/audit/export.jsonl?{filters.query()}",
            "one_line_time": one_line_time,
        },
    )


def _page(
    session: Session, filters: AuditFilter, viewer: Viewer, page: int
) -> tuple[list[AuditEvent], int]:
    where = filters.conditions(viewer)
    total = session.scalar(select(func.count()).select_from(AuditEvent).where(*where)) or 0
    rows = session.scalars(
        select(AuditEvent)
        .where(*where)
        .order_by(AuditEvent.seq.desc())
        .offset((page - 1) * PAGE_SIZE)
        .limit(PAGE_SIZE)
    )
    return list(rows), total


@router.get("/audit/export.{fmt}")
def audit_export(
    request: Request,
    fmt: str,
    portal: PortalDep,
    viewer: AdminViewer,
    actor: Param = "",
    action: Param = "",
    device: Param = "",
    since: Annotated[str, Query(alias="from", max_length=32)] = "",
    until: Annotated[str, Query(max_length=32)] = "",
) -> Response:
    if fmt not in ("csv", "jsonl"):
        return portal.message(request, "Not found", "Export as csv or jsonl.", status_code=404)
    filters = _filter_from(actor, action, device, since, until)
    if isinstance(filters, str):
        return portal.message(request, "Bad filter", filters, status_code=400)
    lines = _csv_lines if fmt == "csv" else _jsonl_lines
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        lines(_export_rows(portal, filters, viewer)),
        media_type=media,
        headers={"content-disposition": f'attachment; filename="rly-audit-{stamp}.{fmt}"'},
    )


def _export_rows(portal: Portal, filters: AuditFilter, viewer: Viewer) -> Iterator[dict[str, Any]]:
    """Every matching row, in chain order, read in batches by seq (no long-held cursor)."""
    where = filters.conditions(viewer)
    after = 0
    while True:
        with portal.sessions() as session:
            batch = list(
                session.scalars(
                    select(AuditEvent)
                    .where(*where, AuditEvent.seq > after)
                    .order_by(AuditEvent.seq)
                    .limit(EXPORT_BATCH)
                )
            )
        for row in batch:
            yield export_record(row)
        if len(batch) < EXPORT_BATCH:
            return
        after = batch[-1].seq


def export_record(row: AuditEvent) -> dict[str, Any]:
    """One row as exported: the hashed fields (time as in the hash) plus id and hashes."""
    record = {name: getattr(row, name) for name in EXPORT_FIELDS}
    record["at"] = row.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return record


def _jsonl_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    for record in rows:
        yield json.dumps(record, ensure_ascii=True) + "\n"


def _csv_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_FIELDS)
    for record in rows:
        writer.writerow([_cell(record[name]) for name in EXPORT_FIELDS])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
