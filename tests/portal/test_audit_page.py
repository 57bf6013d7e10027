"""The audit page: account scope, filters, newest first, paging, CSV and JSON-lines export."""

from __future__ import annotations

import csv
import io
import json
import re

from sqlalchemy import select

from core import audit
from core.audit_verify import verify
from core.models import Account, AuditEvent
from tests.portal.support import Client, PortalEnv


def _seed(env: PortalEnv, n: int) -> int:
    """n rows for acme (device dev-7 on the odd ones) and one for account other; acme's id."""
    with env.sessions() as s, s.begin():
        acme = s.scalars(select(Account.id).where(Account.name == "acme")).one()
        other = s.scalars(select(Account.id).where(Account.name == "other")).one()
        for i in range(n):
            audit.record(
                s,
                action="tunnel.up" if i % 2 else "session.start",
                actor="relay" if i % 2 else "alice",
                account_id=acme,
                target="dev-7" if i % 2 else "dev-8",
                detail=f"row {i}",
                source_ip="203.0.113.9",
            )
        audit.record(s, action="tunnel.up", actor="relay", account_id=other, detail="secret")
        audit.record(s, action="x.formula", account_id=acme, detail="=HYPERLINK(1)")
    return acme


def _admin(env: PortalEnv) -> Client:
    env.add_user("mallory", account="other")
    admin = env.add_user("root", role="admin")
    client = env.client()
    client.login_user(admin)
    return client


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-label="#" class="nowrap"><span[^>]*>(\d+)<', html)]


def test_pages_newest_first_within_the_account(env: PortalEnv) -> None:
    """50 rows a page, newest first, only the admin's account; a technician is refused."""
    client = _admin(env)
    _seed(env, 120)
    first = client.http.get("/audit")
    assert first.status_code == 200
    ids = _ids(first.text)
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)
    assert "secret" not in first.text
    shown = re.search(r"(\d+) events in account acme", first.text)
    assert shown, first.text
    total = int(shown.group(1))
    last_page = -(-total // 50)
    assert f"Page 1 of {last_page}." in first.text
    last = client.http.get(f"/audit?page={last_page}")
    assert 0 < len(_ids(last.text)) <= 50 and max(_ids(last.text)) < min(ids)
    tech = env.add_user("tom")
    other = env.client()
    other.login_user(tech)
    assert other.http.get("/audit").status_code == 403


def test_filters_narrow_rows_and_a_bad_one_is_one_sentence(env: PortalEnv) -> None:
    """Actor, action and device filters combine; a malformed time is a 400 with one sentence."""
    client = _admin(env)
    _seed(env, 20)
    page = client.http.get("/audit", params={"actor": "RELAY", "device": "dev-7"})
    assert "10 events match" in page.text
    assert "session.start" not in page.text.split("<tbody>")[1]
    page = client.http.get("/audit", params={"action": "session.", "from": "2000-01-01T00:00"})
    assert "10 events match" in page.text
    future = client.http.get("/audit", params={"from": "2999-01-01"})
    assert "0 events match" in future.text and "No events match." in future.text
    bad = client.http.get("/audit", params={"until": "tomorrow"})
    assert bad.status_code == 400
    assert "The until time must look like 2026-12-01T09:30 (UTC)." in bad.text


def test_exports_carry_the_chain_and_defuse_formulas(env: PortalEnv) -> None:
    """JSON lines give the exact rows with their hashes (chain order); CSV prefixes formulas."""
    client = _admin(env)
    _seed(env, 6)
    jsonl = client.http.get("/audit/export.jsonl", params={"action": "x.formula"})
    assert jsonl.status_code == 200
    assert "attachment" in jsonl.headers["content-disposition"]
    (record,) = [json.loads(line) for line in jsonl.text.splitlines()]
    with env.sessions() as s:
        row = s.scalars(select(AuditEvent).where(AuditEvent.action == "x.formula")).one()
        assert verify(s).intact
    assert record["detail"] == "=HYPERLINK(1)"
    assert (record["seq"], record["row_hash"], record["prev_hash"]) == (
        row.seq,
        row.row_hash,
        row.prev_hash,
    )
    every = client.http.get("/audit/export.jsonl").text.splitlines()
    seqs = [json.loads(line)["seq"] for line in every]
    assert seqs == sorted(seqs) and all("secret" not in line for line in every)
    table = list(csv.reader(io.StringIO(client.http.get("/audit/export.csv").text)))
    assert table[0][:4] == ["id", "seq", "at", "action"]
    assert [r[7] for r in table[1:] if r[3] == "x.formula"] == ["'=HYPERLINK(1)"]
    assert client.http.get("/audit/export.xml").status_code == 404
