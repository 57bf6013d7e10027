"""The portal as a console, with every real part: recordings played, the audit log, approvals.

One `rly serve` (input recording on, approval cache 10 min) with a real
`rly-client` device whose target is a real sshd; technicians are OpenSSH `ssh`
in a PTY; the portal is driven in headless Chromium. Screenshots go to the
test's temporary directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncssh
import pytest
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select, update

from core.audit import row_digest
from core.models import AuditEvent, SshSession, User, UserKey
from tests.e2e.stack import DeviceUnderTest, Stack, wait_for
from tests.e2e.technician_support import (
    PortalBrowser,
    add_portal_user,
    approval_request,
    prompt,
)
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician, TechnicianFactory

pytestmark = pytest.mark.slow

CONFIG = {
    "relay": {
        "connect_timeout": "2s",
        "keepalive_interval": "2s",
        "keepalive_count": 2,
        "record_input": True,
        "approval_cache": "10m",
    },
}
ALICE = prompt("alice", "acme")


@dataclass
class Console:
    stack: Stack
    nas: DeviceUnderTest
    alice: PortalBrowser  # admin of acme, with an SSH key
    bob: PortalBrowser  # admin of acme
    carol: PortalBrowser  # technician of acme, with an SSH key
    keys: dict[str, Path]
    workdir: Path

    @property
    def port(self) -> int:
        return self.stack.server.technician_port

    def key_login(self, factory: TechnicianFactory, user: str) -> Technician:
        return factory(self.port, user=user, password=None, identity_file=self.keys[user])

    def keys_fingerprint(self, user: str) -> str:
        with self.stack.db() as s:
            return s.scalars(
                select(UserKey.fingerprint).join(User).where(User.username == user)
            ).one()

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.workdir / f"{name}.png"), full_page=True)

    def audit_rows(self, action: str) -> list[AuditEvent]:
        with self.stack.db() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def _key(stack: Stack, workdir: Path, user: str) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = workdir / f"{user}_key"
    key.write_private_key(str(path))
    path.chmod(0o600)
    key.write_public_key(str(path) + ".pub")
    stack.server.run_cli("user", "add-key", user, str(path) + ".pub", check=True)
    return path


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[Console]:
    workdir: Path = tmp_path_factory.mktemp("console")
    servers, processes, sshds = RlyFactory(workdir), ProcessFactory(workdir), SshdFactory(workdir)
    portals: list[PortalBrowser] = []
    try:
        stack = Stack(servers(config=CONFIG), processes, sshds, workdir)
        with ThreadPoolExecutor(3) as pool:  # CLI start-ups dominate: run them side by side
            device = pool.submit(stack.enroll_device, hostname="nas-rec", serial="SN-REC-1")
            users = [
                pool.submit(add_portal_user, stack.server, name, account="acme")
                for name in ("alice", "bob", "carol")
            ]
            alice, bob, carol = (u.result() for u in users)
            key_jobs = {n: pool.submit(_key, stack, workdir, n) for n in ("alice", "carol")}
            keys = {name: job.result() for name, job in key_jobs.items()}
            nas = device.result()
        nas.start()
        with stack.db() as s, s.begin():  # admins of acme (rly user add makes technicians)
            s.execute(update(User).where(User.username.in_(("alice", "bob"))).values(role="admin"))
        for user in (alice, bob, carol):
            portals.append(PortalBrowser(browser.new_context(), stack.server, user))
            portals[-1].log_in()
        stack.wait_online(nas.id)
        yield Console(stack, nas, portals[0], portals[1], portals[2], keys, workdir)
    finally:
        for portal in portals:
            portal.close()
        processes.stop_all()
        sshds.stop_all()
        servers.stop_all()


def _device_session(console: Console, tech: Technician, marker: str) -> str:
    """Connect to the device, print `marker-42`, return the session id (still open)."""
    tech.sendline(f"connect {console.nas.id}")
    tech.sendline(f"echo {marker}-$((6*7))")
    tech.expect(f"{marker}-42")

    def newest() -> str | None:
        with console.stack.db() as s:
            return s.scalar(
                select(SshSession.id)
                .where(SshSession.ended_at.is_(None), SshSession.device_id == console.nas.id)
                .order_by(SshSession.started_at.desc())
            )

    return wait_for(newest, 5, "the session row")


def _approved_menu(console: Console, factory: TechnicianFactory) -> Technician:
    tech = factory(console.port)
    console.alice.approve(*approval_request(tech))
    tech.expect(ALICE, timeout=5)
    return tech


def test_recording_plays_in_the_portal_with_input_and_download(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """A finished OpenSSH session's recording plays in the player (device output visible);
    its .cast downloads with the typed input as "i" events."""
    tech = _approved_menu(console, technician_factory)
    session_id = _device_session(console, tech, "played")
    tech.sendline("exit")
    tech.expect(ALICE)
    page = console.alice.page
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{console.stack.server.base_url}/recordings/{session_id}")
    expect(page.locator("#player")).to_contain_text("played-42", timeout=15_000)
    console.shot(page, "recording-played")
    cast = page.request.get(
        f"{console.stack.server.base_url}/recordings/{session_id}/cast?download=1"
    )
    assert cast.ok
    assert "attachment" in cast.headers["content-disposition"]
    events = [json.loads(line) for line in cast.text().splitlines()[1:]]
    typed = "".join(e[2] for e in events if e[1] == "i")
    assert "echo played-$((6*7))" in typed
    assert "played-42" in "".join(e[2] for e in events if e[1] == "o")
    csp = page.request.get(f"{console.stack.server.base_url}/recordings/{session_id}")
    assert "script-src 'self' 'wasm-unsafe-eval'" in csp.headers["content-security-policy"]


def test_live_recording_is_followed(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """The recording page of a running session shows output typed after the page was opened."""
    tech = _approved_menu(console, technician_factory)
    session_id = _device_session(console, tech, "before")
    page = console.bob.page
    page.goto(f"{console.stack.server.base_url}/recordings/{session_id}")
    expect(page.get_by_text("live", exact=True)).to_be_visible()
    expect(page.locator("#player")).to_contain_text("before-42", timeout=15_000)
    tech.sendline("echo after-$((7*7))")
    tech.expect("after-49")
    expect(page.locator("#player")).to_contain_text("after-49", timeout=15_000)
    console.shot(page, "recording-live")
    tech.sendline("exit")
    tech.expect(ALICE)


def test_technician_sees_only_own_recordings(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """Carol (technician) gets 404 for the page and the file of a session alice approved."""
    tech = _approved_menu(console, technician_factory)
    session_id = _device_session(console, tech, "private")
    tech.sendline("exit")
    tech.expect(ALICE)
    base = console.stack.server.base_url
    response = console.carol.page.goto(f"{base}/recordings/{session_id}")
    assert response is not None and response.status == 404
    cast = console.carol.page.request.get(f"{base}/recordings/{session_id}/cast")
    assert cast.status == 404


def test_rly_approve_lets_a_waiting_openssh_session_in(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """`rly approve CODE --user alice` at the server lets the waiting session in, actor cli."""
    tech = technician_factory(console.port)
    _url, code = approval_request(tech)
    refused = console.stack.server.run_cli("approve", code)
    assert refused.returncode == 2
    assert "--user" in refused.stderr
    done = console.stack.server.run_cli("approve", code.replace("-", "").lower(), "--user", "alice")
    assert done.returncode == 0, done.stderr
    tech.expect(ALICE, timeout=5)
    rows = [r for r in console.audit_rows("approval.approved") if f"code={code}" in r.detail]
    assert [r.actor for r in rows] == ["cli"]
    again = console.stack.server.run_cli("approve", code, "--user", "alice")
    assert again.returncode == 2
    assert f"no pending approval request has the code {code}" in again.stderr


def test_approval_cache_lets_a_reconnect_in_until_revoked(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """After one approval alice's key login reconnects without approval; revoked in the
    portal, the next login asks again (the running session goes on)."""
    first = console.key_login(technician_factory, "alice")
    console.alice.approve(*approval_request(first))
    first.expect(ALICE, timeout=5)
    second = console.key_login(technician_factory, "alice")
    second.expect("remembered approval of alice", timeout=10)
    second.expect(ALICE)
    assert console.audit_rows("approval.cache_used")

    page = console.alice.page
    page.goto(f"{console.stack.server.base_url}/approvals/remembered")
    expect(page.locator("table")).to_contain_text(console.keys_fingerprint("alice"))
    console.shot(page, "remembered")
    page.get_by_role("button", name="Revoke").first.click()
    expect(page.locator("table")).to_contain_text("No remembered approvals.")
    assert console.audit_rows("approval_cache.revoked")

    third = console.key_login(technician_factory, "alice")
    approval_request(third)  # a new approval is asked for
    second.sendline("whoami")  # the session let in by the cache still runs
    second.expect(ALICE)
    for tech in (first, second, third):
        tech.close()


def test_second_person_approval_refuses_self_approval(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """With --second-approver on, carol cannot approve her own key login; bob can, and the
    session acts as carol. The portal shows the setting."""
    server = console.stack.server
    assert server.run_cli("account", "set", "acme", "--second-approver", "on").returncode == 0
    try:
        tech = console.key_login(technician_factory, "carol")
        url, code = approval_request(tech)
        response = console.carol.page.goto(server.rebase(url))
        assert response is not None and response.status == 403
        expect(console.carol.page.locator("main")).to_contain_text("someone other than carol")
        console.bob.open_request(url, code)
        expect(console.bob.page.locator("main")).to_contain_text("as carol")
        console.bob.click("Approve")
        console.bob.expect_outcome("Approved")
        tech.expect(prompt("carol", "acme"), timeout=5)
        console.bob.page.goto(f"{server.base_url}/approvals/remembered")
        expect(console.bob.page.locator("#second-approver")).to_contain_text("on")
    finally:
        server.run_cli("account", "set", "acme", "--second-approver", "off", check=True)


def test_audit_page_filters_pages_and_exports(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """Filters narrow the rows, the Source column and one-line times fit at 1400 px (no
    overflow at 390 px), and the JSON-lines export carries hashes that match the rows."""
    tech = _approved_menu(console, technician_factory)
    _device_session(console, tech, "audited")
    tech.sendline("exit")
    tech.expect(ALICE)
    page = console.alice.page
    page.set_viewport_size({"width": 1400, "height": 900})
    base = console.stack.server.base_url
    page.goto(f"{base}/audit?action=session.")
    actions = page.locator("td[data-label=Action]").all_inner_texts()
    assert actions and all(a.startswith("session.") for a in actions)
    source = page.locator("th", has_text="Source").bounding_box()
    assert source is not None and source["x"] + source["width"] <= 1400
    one_line = page.locator("td[data-label=Time] time").first.evaluate(
        "t => t.getClientRects().length"
    )
    assert one_line == 1
    shown = page.locator("td[data-label=Time] time").first.inner_text()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d\s\d\d:\d\d:\d\d\sUTC", shown), shown
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    console.shot(page, "audit")
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    console.shot(page, "audit-390")
    page.set_viewport_size({"width": 1400, "height": 900})
    jsonl = page.request.get(f"{base}/audit/export.jsonl?action=session.")
    records = [json.loads(line) for line in jsonl.text().splitlines()]
    assert records and {r["action"][:8] for r in records} == {"session."}
    for record in records:
        row = AuditEvent(**{k: v for k, v in record.items() if k not in ("id", "row_hash")})
        row.at = datetime.fromisoformat(record["at"].replace("Z", "+00:00"))
        assert row_digest(row) == record["row_hash"]
    csv = page.request.get(f"{base}/audit/export.csv?action=session.")
    assert csv.text().splitlines()[0].startswith("id,seq,at,action")
    bad = page.request.get(f"{base}/audit?from=yesterday")
    assert bad.status == 400
    assert re.search(r"must look like", bad.text())


def test_remembered_approval_lets_a_key_login_proxyjump(
    console: Console, technician_factory: TechnicianFactory
) -> None:
    """A key login with a live remembered approval may `ssh -J` to a device at once."""
    first = console.key_login(technician_factory, "alice")
    console.alice.approve(*approval_request(first))
    first.expect(ALICE, timeout=5)
    used = len(console.audit_rows("approval.cache_used"))
    config = console.workdir / "jump_config"
    config.write_text(
        f"Host relay\n  HostName 127.0.0.1\n  Port {console.port}\n  User alice\n"
        f"  IdentityFile {console.keys['alice']}\n  IdentitiesOnly yes\n"
        "  PubkeyAuthentication yes\n  PasswordAuthentication no\n"
        "  KbdInteractiveAuthentication no\n"
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
    )
    jump = technician_factory(
        22,
        user="root",
        host="nas-rec",
        password=None,
        args=["-F", str(config), "-J", "relay"],
        command=["echo", "jumped-$((2*3))"],
    )
    jump.expect("jumped-6", timeout=15)
    assert jump.expect_eof() == 0
    assert len(console.audit_rows("approval.cache_used")) == used + 1
    first.close()
