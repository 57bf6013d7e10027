"""A real Chromium (JavaScript off) against a real `rly serve`: enrol, log in, approve."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from playwright.sync_api import Browser, expect

from core import approvals
from core.db import make_engine, make_sessions
from core.models import Approval
from tests.support.rly_server import RlyFactory

PASSWORD = "browser test password"


@pytest.mark.slow
def test_browser_login_enrol_and_approve(rly_factory: RlyFactory, browser: Browser) -> None:
    """Without JavaScript, a technician enrols TOTP, logs in and approves; the row is approved."""
    server = rly_factory()
    server.run_cli("account", "add", "acme", check=True)
    added = server.run_cli(
        "user",
        "add",
        "alice",
        "--account",
        "acme",
        "--password-stdin",
        input=PASSWORD + "\n",
        check=True,
    )
    uri = re.search(r"otpauth://\S+", added.stdout)
    assert uri, added.stdout
    totp = pyotp.TOTP(parse_qs(urlsplit(uri.group(0)).query)["secret"][0])
    engine = make_engine(f"sqlite:///{server.data_dir / 'rly.sqlite3'}")
    sessions = make_sessions(engine)
    try:
        with sessions() as s, s.begin():
            approval, token = approvals.create_approval(
                s,
                ssh_login="partner",
                required_user_id=None,
                client_ip="198.51.100.7",
                client_version="SSH-2.0-OpenSSH_9.2p1",
                relay_node="browser-node",
                ttl=300,
            )
            approval_id, code = approval.id, approval.code
        context = browser.new_context(java_script_enabled=False)
        try:
            page = context.new_page()
            page.goto(f"{server.base_url}/approve/{token}")
            expect(page).to_have_url(re.compile(r"/login\?next="))
            page.get_by_label("Username").fill("alice")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Set up your authenticator")).to_be_visible()
            assert page.locator(".qr svg").count() == 1
            page.get_by_label("Code from the app").fill(totp.now())
            page.get_by_role("button", name="Confirm").click()
            expect(page.get_by_role("heading", name="Approve SSH login?")).to_be_visible()
            expect(page.locator("#verification-code")).to_have_text(code)
            expect(page.get_by_text("browser-node")).to_be_visible()
            page.get_by_role("button", name="Approve").click()
            expect(page.get_by_role("heading", name="Approved")).to_be_visible()
        finally:
            context.close()
        with sessions() as s:
            row = s.get(Approval, approval_id)
            assert row is not None
            assert row.status == "approved"
            assert row.decided_by is not None
    finally:
        engine.dispose()
