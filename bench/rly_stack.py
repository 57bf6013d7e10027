"""The rly side of the bench: `rly serve`, one real `rly-client`, an approver, a technician.

Written against the documented interfaces (README, docs/architecture.md), so
each step that is not built yet raises `Unavailable` with the step's name
instead of crashing the run. The approver creates a portal user and a logged-
in portal session directly in the database (no browser, no TOTP dance), then
approves with the real HTTP POST of the approval page; if the portal does not
answer it decides in the database and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import asyncssh
import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bench.common import Unavailable
from bench.cpu import Sides
from bench.openssh import CIPHER, SshPath, wait_for_master
from bench.stream import URL_RE
from core import db
from tests.support.procs import ManagedProcess, ProcessExited
from tests.support.rly_server import RlyServer
from tests.support.technician import Technician

ACCOUNT = "bench"
PORTAL_USER = "bench-approver"
# The menu prompt is not fixed by the contract yet: any line ending in "> ".
MENU_PROMPT = r"> $"
DEVICE_PROMPT = r"[#$] $"


def rly_client_argv() -> list[str]:
    """`rly-client` if installed, else the same entry point through this interpreter."""
    found = shutil.which("rly-client")
    if found:
        return [found]
    return [
        sys.executable,
        "-c",
        "import sys; from device_client.cli import main; sys.exit(main())",
    ]


def start_server(
    work: Path,
    stack: ExitStack,
    config: Mapping[str, Any] | None = None,
    *,
    only: str | None = None,
    database_url: str | None = None,
) -> RlyServer:
    """`rly serve` on loopback ports (stopped with the stack); Unavailable if it does not start.

    On PostgreSQL `rly db upgrade` runs first, as the README says it must.
    """
    server = RlyServer(work, config=config, only=only, database_url=database_url)
    stack.callback(server.stop)
    if database_url is not None:
        cli(server, "db", "upgrade")
    try:
        server.start()
    except (ProcessExited, TimeoutError, AssertionError) as exc:
        raise Unavailable(f"rly serve did not start: {str(exc).splitlines()[0]}") from None
    cli(server, "account", "add", ACCOUNT)
    return server


def cli(server: RlyServer, *args: str) -> str:
    """Run an admin command; Unavailable with its error line if it fails."""
    result = server.run_cli(*args)
    if result.returncode != 0:
        raise Unavailable(
            f"rly {args[0]} {args[1] if len(args) > 1 else ''}: {result.stderr.strip()}"
        )
    return result.stdout


def sessions_for(server: RlyServer) -> tuple[Engine, sessionmaker[Session]]:
    """An engine on the server's database (the SQLite file unless a URL is configured)."""
    url = server.config.get("database_url") or f"sqlite:///{server.data_dir / 'rly.sqlite3'}"
    engine = db.make_engine(url)
    return engine, db.make_sessions(engine)


def enroll_device(
    server: RlyServer,
    work: Path,
    stack: ExitStack,
    target_port: int,
    name: str = "bench-dev",
    target: str = "sshd",
) -> tuple[str, int]:
    """Enroll a real rly-client (target: the sshd on `target_port`, or its builtin server),
    run it, wait for its tunnel; return its device id and the `rly-client run` pid."""
    out = cli(server, "enroll-token", "create", "--account", ACCOUNT, "--auto-accept")
    token = re.search(r"token (\S+)", out)
    if token is None:
        raise Unavailable("enroll-token create printed no token")
    config = work / f"{name}.toml"
    argv = [*rly_client_argv(), "enroll", "--tracker", server.base_url, "--token", token.group(1)]
    argv += ["--config", str(config), "--target", target]
    argv += ["--target-port", str(target_port)] if target == "sshd" else []
    argv += ["--hostname", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise Unavailable(f"rly-client enroll: {done.stderr.strip()[-200:]}")
    run = ManagedProcess(
        [*rly_client_argv(), "run", "--config", str(config)], workdir=work, name=f"client-{name}"
    )
    stack.callback(run.stop)
    run.start()
    _wait_for_tunnel(config, run)
    found = re.search(r'device_id\s*=\s*"([^"]+)"', config.read_text())
    if found is None:
        raise Unavailable("rly-client config has no device_id")
    return found.group(1), run.pid


def _wait_for_tunnel(config: Path, run: ManagedProcess, timeout: float = 30.0) -> None:
    """`rly-client status` exits 0 once the client runs with its tunnel up."""
    deadline = time.monotonic() + timeout
    status = [*rly_client_argv(), "status", "--config", str(config)]
    while time.monotonic() < deadline:
        if subprocess.run(status, capture_output=True, timeout=30, check=False).returncode == 0:
            return
        if not run.running:
            raise Unavailable(f"rly-client run exited: {run.stderr.strip()[-200:]}")
        time.sleep(0.2)
    raise Unavailable(f"rly-client tunnel not up within {timeout:g}s")


def create_devices(server: RlyServer, ids: list[str]) -> list[tuple[str, asyncssh.SSHKey]]:
    """Accepted Device rows straight in the database, one fresh ed25519 key each."""
    from core.accounts import get_account
    from core.models import Device

    engine, sessions = sessions_for(server)
    made: list[tuple[str, asyncssh.SSHKey]] = []
    try:
        with sessions() as session, session.begin():
            account = get_account(session, ACCOUNT)
            for device_id in ids:
                key = asyncssh.generate_private_key("ssh-ed25519")
                public = key.export_public_key().decode().strip()
                session.add(
                    Device(
                        id=device_id,
                        account_id=account.id,
                        hostname=device_id,
                        serial=device_id,
                        public_key=public,
                        key_fingerprint=key.get_fingerprint(),
                        status="accepted",
                    )
                )
                made.append((device_id, key))
    finally:
        engine.dispose()
    return made


class Approver:
    """Approves approval URLs as a portal user, by HTTP POST when the portal answers."""

    def __init__(self, server: RlyServer) -> None:
        self.server = server
        self.engine, self.sessions = sessions_for(server)
        self.user_id, cookie, self.csrf = self._portal_login()
        self.http = httpx.Client(cookies={"rly_session": cookie}, timeout=10)
        self.method = "http"

    def _portal_login(self) -> tuple[int, str, str]:
        from approval_portal.auth import create_session, session_id
        from core.accounts import add_user
        from core.models import PortalSession

        with self.sessions() as session, session.begin():
            user = add_user(
                session,
                username=PORTAL_USER,
                account_name=ACCOUNT,
                role="admin",
                password="bench-not-a-secret-1",  # noqa: S106 - never used to log in
                actor="bench",
            )
            user.totp_confirmed = True
            token = create_session(session, user_id=user.id, totp_ok=True, ttl=3600)
            row = session.get(PortalSession, session_id(token))
            assert row is not None
            return user.id, token, row.csrf_token

    def approve(self, url: str) -> None:
        """Click Approve on `url` (an approval link as printed by the relay)."""
        if self.method == "http":
            target = self.server.rebase(url)
            data = {"decision": "approve", "csrf": self.csrf}
            reply = self.http.post(target, data=data)
            if reply.status_code == 200:
                return
            if reply.status_code != 404:
                raise Unavailable(f"portal approve POST: HTTP {reply.status_code}")
            self.method = "database"
        found = URL_RE.search(url)
        self._decide_in_db(found.group(2) if found else url)

    def _decide_in_db(self, token: str) -> None:
        from core.approvals import decide
        from core.models import User

        with self.sessions() as session, session.begin():
            user = session.get(User, self.user_id)
            assert user is not None
            decide(session, token=token, user=user, approve=True, source_ip="127.0.0.1")

    def close(self) -> None:
        self.http.close()
        self.engine.dispose()


def technician(
    server: RlyServer, *, args: tuple[str, ...] = (), timeout: float = 15.0
) -> Technician:
    """`ssh partner@relay` in a PTY with the bench cipher, gate password answered."""
    try:
        return Technician(
            server.technician_port,
            options={"Ciphers": CIPHER, "EscapeChar": "none"},
            args=args,
            timeout=timeout,
        )
    except AssertionError as exc:
        raise Unavailable(f"technician login: {_last_line(exc)}") from None


def approve_session(tech: Technician, approver: Approver) -> float:
    """Wait for the URL, approve it and wait for the menu; return seconds from POST to prompt."""
    try:
        url = tech.expect(URL_RE).group(1)
        start = time.perf_counter()
        approver.approve(url)
        tech.expect(MENU_PROMPT)
        return time.perf_counter() - start
    except AssertionError as exc:
        raise Unavailable(f"approval to menu: {_last_line(exc)}") from None


@contextmanager
def technician_master(server: RlyServer, approver: Approver, control: Path) -> Iterator[Technician]:
    """An approved `ssh -M` technician connection whose ControlMaster later sessions reuse."""
    tech = technician(server, args=("-M", "-S", str(control)))
    try:
        approve_session(tech, approver)
        wait_for_master(control, ("-F", "/dev/null"), "partner@127.0.0.1")
        yield tech
    finally:
        tech.close()


def rly_path(
    name: str,
    server: RlyServer,
    control: Path,
    device: tuple[str, int],
    approver: Approver,
    *,
    data: bool,
    target: str,
) -> SshPath:
    """The menu path `ssh partner@relay connect DEVICE 'cmd'` over the technician's master.

    Relay side: the `rly serve` process; device side: `rly-client run` (for the builtin
    target that includes the target's own SSH server, which sshd is on the other paths).
    """
    device_id, client_pid = device
    options = ["-F", "/dev/null", "-p", str(server.technician_port)]
    options += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    options += ["-o", "LogLevel=ERROR", "-o", "EscapeChar=none", "-o", f"Ciphers={CIPHER}"]
    far = f"device sshd: asyncssh↔OpenSSH {CIPHER}" if target == "sshd" else "builtin: asyncssh"
    hops = (
        f"ssh→relay (technician port): OpenSSH↔asyncssh {CIPHER}",
        "rly-client→relay (device tunnel): asyncssh, relay prefers aes128-gcm@openssh.com",
        (
            f"relay→{far} (per-session data connection, "
            + ("spliced by rly-client)" if target == "sshd" else "on rly-client's socket)")
        )
        if data
        else f"relay→{far} (inside the tunnel)",
    )
    assert server.process is not None
    return SshPath(
        name,
        tuple(options),
        ("partner@127.0.0.1", "connect", device_id),
        hops,
        control,
        approver.approve,
        Sides(relay=(server.process.pid,), device=(client_pid,)),
    )


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
