"""Start every process the shared legs need, in dependency order, and always stop them.

One `ExitStack` owns every process: whatever happens (an exception, Ctrl-C),
leaving `open_topology` stops everything started so far, newest first. The rly
pieces are optional: if one step fails, the reason is kept per path and the
OpenSSH baselines still run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Unavailable
from bench.openssh import (
    ClientKey,
    SshPath,
    baseline_paths,
    start_master,
    start_reverse_tunnel,
    start_sshd,
)
from bench.rly_stack import (
    Approver,
    enroll_device,
    rly_path,
    start_server,
    technician_master,
)
from tests.support.rly_server import RlyServer
from tests.support.technician import Technician

BASELINES = ("direct", "proxyjump", "reverse")
# rly paths: "rly" is the default (per-session data connection, sshd target); "rly-builtin"
# the same to rly-client's builtin server; "rly-tunnel" the in-tunnel path (a second relay
# with relay.data_connect_timeout = 0, i.e. what plain OpenSSH devices and fallbacks get)
TUNNEL_RELAY = {"relay": {"data_connect_timeout": "0s"}}


@dataclass
class Topology:
    """What the shared legs measure against: multiplexed paths by name and the rly pieces."""

    work: Path
    paths: dict[str, SshPath] = field(default_factory=dict)
    logins: dict[str, SshPath] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    server: RlyServer | None = None
    approver: Approver | None = None
    menu: Technician | None = None
    device_id: str = ""
    menus: dict[str, tuple[Technician, str]] = field(default_factory=dict)  # path -> menu, device

    @property
    def hops(self) -> dict[str, list[str]]:
        return {name: list(path.hops) for name, path in self.paths.items()}


@contextmanager
def open_topology(work: Path, *, rly: bool) -> Iterator[Topology]:
    """Start the OpenSSH baselines (and, if `rly`, the rly stack); stop all of it on exit."""
    topo = Topology(work)
    with ExitStack() as stack:
        server = _start_rly_server(topo, stack) if rly else None
        tunnel_server = _start_tunnel_server(topo, stack) if server is not None else None
        ca_keys = [_user_ca(s) for s in (server, tunnel_server) if s is not None]
        key = ClientKey(work)
        device = start_sshd(work, stack, key, ca_keys)
        jump = start_sshd(work, stack, key, [])
        tunnel = start_reverse_tunnel(work, stack, key, jump, device)
        for name, path in baseline_paths(key, device, jump, tunnel).items():
            topo.logins[name] = path
            topo.paths[name] = start_master(work, stack, path)
        if server is not None:
            try:
                _start_rly_paths(topo, stack, server, device.port)
            except Unavailable as exc:
                topo.unavailable["rly"] = str(exc)
        if tunnel_server is not None:
            try:
                _start_tunnel_path(topo, stack, tunnel_server, device.port)
            except Unavailable as exc:
                topo.unavailable["rly-tunnel"] = str(exc)
        yield topo


def _start_rly_server(topo: Topology, stack: ExitStack) -> RlyServer | None:
    try:
        server = start_server(topo.work, stack)
    except Unavailable as exc:
        topo.unavailable["rly"] = str(exc)
        return None
    topo.server = server
    return server


def _start_tunnel_server(topo: Topology, stack: ExitStack) -> RlyServer | None:
    work = topo.work / "tunnel-relay"
    work.mkdir(mode=0o700, exist_ok=True)
    try:
        return start_server(work, stack, TUNNEL_RELAY)
    except Unavailable as exc:
        topo.unavailable["rly-tunnel"] = str(exc)
        return None


def _user_ca(server: RlyServer) -> str:
    """The relay's user CA, which the device sshd must trust (TrustedUserCAKeys)."""
    return (server.data_dir / "keys" / "user_ca.pub").read_text().strip()


def _start_rly_paths(topo: Topology, stack: ExitStack, server: RlyServer, target_port: int) -> None:
    """Approver first (the approval leg needs only it), then the devices and the technician."""
    approver = Approver(server)
    stack.callback(approver.close)
    topo.approver = approver
    sshd_device = enroll_device(server, topo.work, stack, target_port)
    topo.device_id = sshd_device[0]
    control = topo.work / "mux-rly"
    topo.menu = stack.enter_context(technician_master(server, approver, control))
    topo.paths["rly"] = rly_path(
        "rly", server, control, sshd_device, approver, data=True, target="sshd"
    )
    topo.menus["rly"] = (topo.menu, sshd_device[0])
    try:
        builtin = enroll_device(server, topo.work, stack, 0, "bench-builtin", target="builtin")
    except Unavailable as exc:
        topo.unavailable["rly-builtin"] = str(exc)
        return
    topo.paths["rly-builtin"] = rly_path(
        "rly-builtin", server, control, builtin, approver, data=True, target="builtin"
    )
    topo.menus["rly-builtin"] = (topo.menu, builtin[0])


def _start_tunnel_path(
    topo: Topology, stack: ExitStack, server: RlyServer, target_port: int
) -> None:
    """The in-tunnel path on its own relay (data connections off), same device sshd."""
    approver = Approver(server)
    stack.callback(approver.close)
    device = enroll_device(server, topo.work, stack, target_port, "bench-tunnel-dev")
    control = topo.work / "mux-rly-tunnel"
    menu = stack.enter_context(technician_master(server, approver, control))
    topo.paths["rly-tunnel"] = rly_path(
        "rly-tunnel", server, control, device, approver, data=False, target="sshd"
    )
    topo.menus["rly-tunnel"] = (menu, device[0])
