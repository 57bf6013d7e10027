"""The forward-control table, end to end, with the real OpenSSH client on both ports.

Technician port (ssh partner@relay): -L, -D, -R, -A, -X and -W, each tried while
the approval URL is shown and again after approval. Each must fail as OpenSSH
sees it (a printed failure or a forward that carries nothing), leave an audit
row `technician.refused_request` (-L, -D, -R, -W, and agent and X11, which the
relay's session channel answers itself), and nothing may reach a device before
approval.

Device port (ssh DEVICE@relay with the device key): exec, -W, a forward as
another device, and a forward naming another device.

Already pinned elsewhere (not repeated): asyncssh -L/-R/streamlocal before and after
approval (tests/relay/test_technician_security.py), asyncssh session/exec/
direct-tcpip/second forward on the device port (tests/relay/test_device_port.py).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from tests.adversarial.proxy import TcpProxy
from tests.relay.device_port_support import (
    connect_device,
    host_ca_public,
    new_key,
    wait_until,
    write_key,
)
from tests.relay.test_technician_support import URL_RE, TechDb, device_tunnel
from tests.support.ports import free_port, wait_for_port
from tests.support.procs import ManagedProcess, ProcessFactory
from tests.support.rly_server import RlyServer
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician

PROMPT = re.escape("rly:alice@acme> ")
REFUSED = "technician.refused_request"


@dataclass
class Env:
    relay: RlyServer
    db: TechDb
    workdir: Path
    processes: ProcessFactory
    account: int
    box: str  # device id of box-1, whose tunnel runs through `proxy` to a real sshd
    proxy: TcpProxy
    agent_sock: Path
    known_hosts: Path = field(init=False)

    def __post_init__(self) -> None:
        self.known_hosts = self.workdir / "relay_known_hosts"
        self.known_hosts.write_text(f"@cert-authority * {host_ca_public(self.relay.data_dir)}\n")

    def refusals(self, detail: str) -> int:
        return sum(detail in e.detail for e in self.db.actions(REFUSED))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("forward-table")
    relay = RlyServer(workdir, config={"relay": {"connect_timeout": "3s", "approval_ttl": "60s"}})
    processes = ProcessFactory(workdir)
    sshds = SshdFactory(workdir)
    db: TechDb | None = None
    proxy: TcpProxy | None = None
    try:
        relay.start()
        db = TechDb(relay.data_dir)
        account = db.add_account("acme")
        db.add_user("alice", "acme")
        user_ca = (relay.data_dir / "keys" / "user_ca.pub").read_text()
        sshd = sshds(trusted_user_ca_keys=[user_ca])
        proxy = TcpProxy(sshd.port).start()
        key = new_key()
        box = db.add_named_device(account, hostname="box-1", key=key)
        device_tunnel(processes, relay, box, key, proxy.port)
        wait_until(lambda: db.open_tunnels(box), timeout=10)
        agent_sock = workdir / "agent.sock"
        processes(["ssh-agent", "-D", "-a", str(agent_sock)], name="ssh-agent")
        wait_until(agent_sock.exists, timeout=5)
        yield Env(relay, db, workdir, processes, account, box, proxy, agent_sock)
    finally:
        processes.stop_all()
        if proxy is not None:
            proxy.close()
        sshds.stop_all()
        if db is not None:
            db.close()
        relay.stop()


# -- technician side -------------------------------------------------------------


def _local_forward_carries_nothing(port: int) -> bool:
    """Connect to ssh's local listener and send a request: True if the channel never opens."""
    wait_for_port("127.0.0.1", port, timeout=5)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        try:
            return sock.recv(4096) == b""
        except ConnectionResetError:
            return True


def _socks_connect_fails(port: int, dest_port: int) -> bool:
    """A SOCKS5 CONNECT through ssh -D: True if ssh reports failure or drops the client."""
    wait_for_port("127.0.0.1", port, timeout=5)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(b"\x05\x01\x00")
        if sock.recv(2) != b"\x05\x00":
            return True
        sock.sendall(
            b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", dest_port)
        )
        try:
            reply = sock.recv(10)
        except ConnectionResetError:
            return True
        return reply == b"" or reply[1] != 0


@dataclass
class Case:
    """How to ask for one kind of forward, and how to see it fail before and after approval."""

    args: Callable[[Env, int], list[str]]
    before: Callable[[Env, Technician, int], None]
    after: Callable[[Env, Technician, int], None]
    audit: Callable[[Env], str] | None  # the refusal's audit detail, where the relay has a hook
    audits: int = 2  # how many refusals (before + after)
    env: dict[str, str] = field(default_factory=dict)


def _l_args(env: Env, port: int) -> list[str]:
    return ["-L", f"{port}:127.0.0.1:{env.relay.http_port}"]


def _l_check(env: Env, tech: Technician, port: int) -> None:
    assert _local_forward_carries_nothing(port)
    tech.expect("open failed")


def _d_check(env: Env, tech: Technician, port: int) -> None:
    assert _socks_connect_fails(port, env.relay.http_port)
    tech.expect("open failed")


def _r_before(env: Env, tech: Technician, port: int) -> None:
    tech.expect("remote port forwarding failed")


def _r_after(env: Env, tech: Technician, port: int) -> None:
    tech.send("\r~C")  # OpenSSH's escape command line asks for a new forward mid-session
    tech.expect("ssh>")
    tech.sendline("-R 0:127.0.0.1:22")
    tech.expect("Forwarding port.")  # OpenSSH does not report this reply; the audit row must


def _nothing(env: Env, tech: Technician, port: int) -> None:
    return None


def _on_device_shows(variable: str) -> Callable[[Env, Technician, int], None]:
    """After approval: in a shell on box-1, the forwarded thing is absent."""

    def check(env: Env, tech: Technician, port: int) -> None:
        tech.sendline("connect box-1")
        tech.sendline(f"echo probe-{variable}=[${variable}]")
        tech.expect(re.escape(f"probe-{variable}=[]"))
        tech.sendline("exit")
        tech.expect(PROMPT)

    return check


def _x_before(env: Env, tech: Technician, port: int) -> None:
    tech.expect("X11 forwarding request failed")


CASES: dict[str, Case] = {
    "-L": Case(_l_args, _l_check, _l_check, lambda e: f"to 127.0.0.1:{e.relay.http_port}"),
    "-D": Case(
        lambda e, p: ["-D", str(p)],
        _d_check,
        _d_check,
        lambda e: f"to 127.0.0.1:{e.relay.http_port}",
    ),
    "-R": Case(
        lambda e, p: ["-R", "0:127.0.0.1:22", "-o", "EnableEscapeCommandline=yes"],
        _r_before,
        _r_after,
        lambda e: "tcpip-forward",
    ),
    "-A": Case(
        # the Technician helper drops $SSH_AUTH_SOCK, so name the agent with IdentityAgent
        lambda e, p: ["-A", "-o", f"IdentityAgent={e.agent_sock}"],
        _nothing,
        _on_device_shows("SSH_AUTH_SOCK"),
        lambda e: "agent forwarding",
        audits=1,  # asked once, on the session channel
    ),
    "-X": Case(
        lambda e, p: ["-X"],
        _x_before,
        _on_device_shows("DISPLAY"),
        lambda e: "x11",
        audits=1,
        env={"DISPLAY": ":99"},
    ),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_technician_forward_refused_before_and_after_approval(
    env: Env, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSH -L/-D/-R/-A/-X get nothing through the relay, before or after approval."""
    case = CASES[kind]
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    detail = case.audit(env) if case.audit else None
    audited = env.refusals(detail) if detail else 0
    sessions = len(env.db.sessions_of(env.box))
    reached = env.proxy.connections
    tech = Technician(
        env.relay.technician_port, args=case.args(env, port), options={"LogLevel": "INFO"}
    )
    try:
        token = tech.expect(URL_RE).group(2)
        case.before(env, tech, port)
        assert env.proxy.connections == reached, "a device was reached before approval"
        assert len(env.db.sessions_of(env.box)) == sessions
        env.db.decide(token, "alice")
        tech.expect(PROMPT, timeout=3)
        case.after(env, tech, port)
        tech.sendline("whoami")  # the session itself is unharmed
        tech.expect("alice")
    except BaseException:
        print(f"--- ssh {tech.argv}\n{tech.output[-3000:]}")
        raise
    finally:
        tech.close()
    if detail is not None:
        _wait_refusals(env, detail, audited + case.audits)


def _wait_refusals(env: Env, detail: str, count: int) -> None:
    wait_until(lambda: env.refusals(detail) >= count, timeout=3)


def test_jump_to_a_device_reaches_nothing_before_approval(env: Env) -> None:
    """`ssh -W DEVICE:22` (how ProxyJump starts): held while the URL is shown, nothing reaches
    the device; a rejection refuses the channel, audited, still without touching the device."""
    sessions = len(env.db.sessions_of(env.box))
    reached = env.proxy.connections
    for dest in ("box-1", env.box):
        tech = Technician(
            env.relay.technician_port, args=["-W", f"{dest}:22"], options={"LogLevel": "INFO"}
        )
        try:
            token = tech.expect(URL_RE).group(2)
            time.sleep(1.0)  # the channel open is pending now
            assert env.proxy.connections == reached, "a device was reached before approval"
            assert len(env.db.sessions_of(env.box)) == sessions
            env.db.decide(token, "alice", approve=False)
            tech.expect("open failed", timeout=3)
            assert tech.expect_eof(timeout=5) == 255
        finally:
            tech.close()
        _wait_refusals(env, f"direct-tcpip to {dest}:22: not approved (rejected)", 1)
    assert env.proxy.connections == reached
    assert len(env.db.sessions_of(env.box)) == sessions


# -- device side ------------------------------------------------------------------


def _device_ssh(
    env: Env, login: str, key_path: Path, *args: str, command: str = ""
) -> ManagedProcess:
    argv = [
        "ssh", "-F", "/dev/null", "-p", str(env.relay.device_port), "-i", str(key_path),
        "-o", f"UserKnownHostsFile={env.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes", *args, f"{login}@127.0.0.1",
    ]  # fmt: skip
    if command:
        argv.append(command)
    return env.processes(argv, name=f"device-ssh-{login}")


DEVICE_CASES: dict[str, tuple[Callable[[Env], list[str]], str, str]] = {
    "exec": (lambda e: ["-T"], "id", "session"),
    "-W": (lambda e: ["-W", f"127.0.0.1:{e.relay.http_port}"], "", "direct-tcpip 127.0.0.1:"),
}


@pytest.mark.parametrize("kind", sorted(DEVICE_CASES))
def test_device_key_may_not_open_channels(env: Env, kind: str) -> None:
    """With OpenSSH and its own key, a device's exec and -W channels are refused and audited."""
    make_args, command, detail = DEVICE_CASES[kind]
    key = new_key()
    device_id = env.db.add_device(env.account, key)
    key_path = write_key(key, env.workdir / f"key_{device_id}")
    proc = _device_ssh(env, device_id, key_path, *make_args(env), command=command)
    assert proc.wait(10) == 255
    assert "open failed" in proc.stderr, proc.tail()
    found = wait_until(lambda: env.db.audits("device.refused_request", device_id), timeout=3)
    assert any(d.startswith(detail) for d in found), found
    assert env.db.tunnels(device_id) == []


def test_device_may_not_forward_as_another_device(env: Env) -> None:
    """OpenSSH -R as device B with A's key: refused, audited "key mismatch", B stays offline."""
    key_a = new_key()
    env.db.add_device(env.account, key_a)
    device_b = env.db.add_device(env.account, new_key())
    key_path = write_key(key_a, env.workdir / "key_a")
    proc = _device_ssh(env, device_b, key_path, "-N", "-R", "0:127.0.0.1:22")
    assert proc.wait(10) == 255
    assert "Permission denied" in proc.stderr, proc.tail()
    assert wait_until(lambda: env.db.audits("device.refused", device_b), timeout=3) == [
        "key mismatch"
    ]
    assert env.db.tunnels(device_b) == []


def test_forward_naming_another_device_stays_the_requesters_own(env: Env) -> None:
    """A device's forward that names another device's id is recorded as its own; B stays offline."""
    key_a = new_key()
    device_a = env.db.add_device(env.account, key_a)
    device_b = env.db.add_named_device(env.account, hostname="victim-1")

    async def scenario() -> None:
        ca = host_ca_public(env.relay.data_dir)
        conn = await connect_device(env.relay.device_port, device_a, key_a, ca)
        try:
            await conn.forward_remote_port(device_b, 0, "127.0.0.1", 9)
            rows = await asyncio.to_thread(wait_until, lambda: env.db.open_tunnels(device_a))
            assert [r.device_id for r in rows] == [device_a]
            assert env.db.open_tunnels(device_b) == []
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port(device_b, 22, "127.0.0.1", 9)
        finally:
            conn.close()

    asyncio.run(scenario())
    assert env.db.tunnels(device_b) == []
    assert wait_until(lambda: env.db.audits("device.refused_request", device_a), timeout=3) == [
        f"second forward {device_b}:22"
    ]
