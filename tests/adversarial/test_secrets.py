"""No secret reaches the server's logs or the audit table, through a whole session's flow."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path

import asyncssh
import httpx
from sqlalchemy import select

from core.models import AuditEvent
from device_client.api import TrackerClient
from tests.adversarial.support import PortalClient, Stack, signed_checkin
from tests.relay.test_technician_support import URL_RE, device_tunnel
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory
from tests.support.technician import TechnicianFactory

GATE = "gate-S3cret-Pa55-7b1"
WRONG = "wrong-S3cret-Pa55-c0d"


def _enroll(base: str, token: str, key: asyncssh.SSHKey) -> str:
    async def run() -> str:
        async with TrackerClient(base) as anonymous:
            reply = await anonymous.enroll(
                {
                    "token": token,
                    "hostname": "box-1",
                    "serial": "",
                    "os_name": "Linux",
                    "os_version": "6",
                    "client_version": "1.0.0",
                    "public_key": key.export_public_key().decode().strip(),
                }
            )
        return reply.device_id

    return asyncio.run(run())


def _key_material(data_dir: Path, extra: list[asyncssh.SSHKey]) -> list[str]:
    """Distinctive slices of every private key the relay and the device hold."""
    pems = [p.read_text() for p in (data_dir / "keys").iterdir() if not p.name.endswith(".pub")]
    pems += [k.export_private_key().decode() for k in extra]
    found = []
    for pem in pems:
        if "PRIVATE KEY" not in pem:
            continue
        body = "".join(line for line in pem.splitlines() if "-----" not in line)
        found += [body[40:80], body[-80:-40]]
    for key in extra:  # the raw private scalar, in case something logs it unencoded
        found.append(base64.b64encode(key.export_private_key("openssh")).decode()[100:140])
    return [f for f in found if len(f) >= 32]


def test_no_secret_in_logs_or_audit(
    rly_factory: RlyFactory,
    sshd_factory: SshdFactory,
    technician_factory: TechnicianFactory,
    process_factory: ProcessFactory,
) -> None:
    """Gate and user passwords (right and wrong), TOTP secret and codes, approval, enrollment
    and session tokens, CSRF tokens and private keys never appear in logs or audit rows."""
    server = rly_factory(
        config={"log_level": "debug", "relay": {"gate_password": GATE, "approval_ttl": "30s"}}
    )
    stack = Stack(server)
    try:
        alice = stack.add_user("alice")
        server.run_cli("account", "add", "acme")
        made = server.run_cli("enroll-token", "create", "--account", "acme", "--auto-accept")
        enroll_token = re.search(r"^token (\S+)$", made.stdout, re.M).group(1)  # type: ignore[union-attr]
        device_key = asyncssh.generate_private_key("ssh-ed25519")
        device_id = _enroll(server.base_url, enroll_token, device_key)
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            assert signed_checkin(http, device_id, device_key).status_code == 200
        user_ca = (server.data_dir / "keys" / "user_ca.pub").read_text()
        target = sshd_factory(trusted_user_ca_keys=[user_ca])
        device_tunnel(process_factory, server, device_id, device_key, target.port)

        wrong = technician_factory(server.technician_port, password=WRONG)
        wrong.expect(r"(?i)password[^\n]*:")
        wrong.close()
        tech = technician_factory(server.technician_port, password=GATE)
        url, token = tech.expect(URL_RE, timeout=10).groups()
        codes = [alice.code(-1), alice.code(), "000000"]
        with PortalClient(server.base_url) as portal:
            assert portal.login(alice, password=WRONG).status_code == 401
            assert portal.login(alice, code="000000").status_code == 401
            login_csrf = portal.form_csrf()
            assert portal.login(alice).status_code == 303
            session_cookie = portal.http.cookies.get("rly_session") or ""
            csrf = portal.csrf()
            assert portal.decide(token, csrf=csrf).status_code == 200
        tech.expect(re.escape("rly:alice@acme> "), timeout=5)
        tech.sendline(f"connect {device_id}")
        tech.sendline("echo marker-$((6*7))")
        tech.expect("marker-42", timeout=10)
        tech.sendline("exit")
        tech.expect(re.escape("rly:alice@acme> "), timeout=5)
        tech.sendline("exit")
        tech.expect_eof(timeout=5)

        secrets = {
            "gate password": GATE,
            "wrong password": WRONG,
            "user password": alice.password,
            "totp secret": alice.secret,
            "approval token": token,
            "enroll token": enroll_token,
            "session cookie": session_cookie,
            "csrf token": csrf,
            "login csrf": login_csrf,
        }
        secrets |= {
            f"key {i}": s for i, s in enumerate(_key_material(server.data_dir, [device_key]))
        }
        assert all(secrets.values()), secrets
        server.stop()
        rows = stack.run(lambda s: list(s.scalars(select(AuditEvent))))
        audit_text = "\n".join(
            f"{r.action} {r.actor} {r.target} {r.detail} {r.source_ip}" for r in rows
        )
        assert "approval.approved" in audit_text and "portal.login_failed" in audit_text
        for where, text in (("log", server.output), ("audit", audit_text)):
            leaked = [name for name, value in secrets.items() if value in text]
            leaked += [f"totp code {c}" for c in codes if re.search(rf"(?<!\d){c}(?!\d)", text)]
            assert not leaked, f"{where} holds {leaked}"
        assert url not in server.output
    finally:
        stack.close()
