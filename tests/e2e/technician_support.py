"""Helpers for the technician end-to-end tests: portal users and a real browser approving.

    user = add_portal_user(server, "alice", account="acme")   # `rly user add --password-stdin`
    portal = PortalBrowser(browser.new_context(), server, user)
    portal.log_in()                     # password, then TOTP enrolment or a fresh code
    url, code = approval_request(tech)  # the link and code the relay printed
    portal.approve(url, code)           # open the link, check the code, click Approve

Every TOTP code is computed with pyotp for a step this user has not used yet,
so two logins of one user never trip the portal's replay protection by accident.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pyotp
from playwright.sync_api import BrowserContext, Page, expect

from tests.support.rly_server import RlyServer
from tests.support.technician import Technician

URL_RE = r"(http://\S+/approve/[A-Za-z0-9_-]+)"
CODE_RE = r"Verification code: ([A-Z2-9]{3}-[A-Z2-9]{3})"
STEP = 30
LOGIN_FAILED = "The username, password or code is not right."


def prompt(username: str, account: str) -> str:
    """The menu prompt (a regex) of a session approved by `username` of `account`."""
    return re.escape(f"rly:{username}@{account}> ")


def approval_request(tech: Technician, timeout: float = 10.0) -> tuple[str, str]:
    """Wait for the approval URL and verification code on the terminal; return both."""
    url = tech.expect(URL_RE, timeout=timeout).group(1)
    code = tech.expect(CODE_RE, timeout=timeout).group(1)
    return url, code


@dataclass
class PortalUser:
    """A portal user created with `rly user add`, with its TOTP secret."""

    username: str
    account: str
    password: str
    secret: str
    last_step: int | None = None

    def fresh_code(self) -> str:
        """A valid code for a time step this user has not used yet (waits if none is left)."""
        current = int(time.time() // STEP)
        step = current if self.last_step is None else max(current, self.last_step + 1)
        if step > current + 1:  # the portal accepts the current step ±1
            time.sleep((step - 1) * STEP - time.time() + 0.1)
        self.last_step = step
        return self.code_at(step)

    def code_at(self, step: int) -> str:
        """The code of one time step."""
        return pyotp.TOTP(self.secret).at(step * STEP)


def add_portal_user(
    server: RlyServer, username: str, *, account: str, password: str | None = None
) -> PortalUser:
    """Create a technician with `rly user add --password-stdin` and parse its TOTP secret."""
    password = password or f"{username} e2e password"
    added = server.run_cli(
        "user",
        "add",
        username,
        "--account",
        account,
        "--password-stdin",
        input=password + "\n",
        check=True,
    )
    uri = re.search(r"otpauth://\S+", added.stdout)
    assert uri, added.stdout
    secret = parse_qs(urlsplit(uri.group(0)).query)["secret"][0]
    return PortalUser(username, account, password, secret)


class PortalBrowser:
    """One browser context (its own cookies) in the portal as one user."""

    def __init__(self, context: BrowserContext, server: RlyServer, user: PortalUser) -> None:
        self.context = context
        self.server = server
        self.user = user
        self.page: Page = context.new_page()
        self.enrolled = False

    def submit_login(self, code: str) -> None:
        """Fill and send the login form (from a fresh /login page)."""
        page = self.page
        page.goto(f"{self.server.base_url}/login")
        page.get_by_label("Username").fill(self.user.username)
        page.get_by_label("Password").fill(self.user.password)
        page.get_by_label("Authenticator code").fill(code)
        page.get_by_role("button", name="Log in").click()

    def log_in(self) -> None:
        """Log in with password and TOTP; the first time, enrol the authenticator instead."""
        if self.enrolled:
            self.submit_login(self.user.fresh_code())
        else:
            self.submit_login("")
            enrol = self.page.get_by_role("heading", name="Set up your authenticator")
            expect(enrol).to_be_visible()
            self.page.get_by_label("Code from the app").fill(self.user.fresh_code())
            self.page.get_by_role("button", name="Confirm").click()
            self.enrolled = True
        self.expect_logged_in()

    def expect_logged_in(self) -> None:
        """The page shows this user's name next to a Log out button."""
        expect(self.page.get_by_role("button", name="Log out")).to_be_visible()
        expect(self.page.locator("form.logout")).to_contain_text(self.user.username)

    def log_out(self) -> None:
        """Press Log out; the portal is back at its login page."""
        self.page.get_by_role("button", name="Log out").click()
        expect(self.page.get_by_role("heading", name="Log in")).to_be_visible()

    def open_request(self, url: str, code: str) -> None:
        """Open an approval link (as printed by the relay) and check its verification code."""
        self.page.goto(self.server.rebase(url))
        expect(self.page.get_by_role("heading", name="Approve SSH login?")).to_be_visible()
        expect(self.page.locator("#verification-code")).to_have_text(code)

    def click(self, decision: str) -> float:
        """Click "Approve" or "Reject" on the open request; return time.monotonic() of the click."""
        button = self.page.get_by_role("button", name=decision)
        clicked = time.monotonic()
        button.click()
        return clicked

    def expect_outcome(self, heading: str) -> None:
        """The page after the decision shows `heading` ("Approved" or "Rejected")."""
        expect(self.page.get_by_role("heading", name=heading)).to_be_visible()

    def approve(self, url: str, code: str) -> None:
        """Open one request, approve it and wait for the portal's confirmation."""
        self.open_request(url, code)
        self.click("Approve")
        self.expect_outcome("Approved")

    def close(self) -> None:
        """Close the context (its pages and cookies)."""
        self.context.close()
