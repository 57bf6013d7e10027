"""Leg: relay peering against the single-node path, on one PostgreSQL (issue 11).

One fleet on a fresh database: `rly serve --only tracker,portal` plus relay-a
(127.0.1.1) and relay-b (127.0.1.2), and a plain OpenSSH `ssh -N -R` device
tunnelled at relay-b to a real sshd. Both paths run `ssh partner@RELAY connect
DEVICE 'cmd'` over an approved ControlMaster, with the bench cipher:

- single-node: the technician on relay-b, the session inside the tunnel (a plain
  `ssh -R` device cannot dial a data connection);
- peering: the technician on relay-a, whose session rides its pooled peering
  connection to relay-b and a channel through the same tunnel.

Keystroke round trips (bench.keystroke) and bulk up/down (bench.throughput) are
interleaved run by run; the targets are the issue's: peering ≤ 1.3x the
single-node latency and ≥ 0.8x its throughput. Relay CPU covers both relays on
the peering path, relay-b only on the single-node path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import keystroke, throughput
from bench.common import LegResult, Scale, Target, Unavailable, interleaved, percentile
from bench.cpu import Sides
from bench.openssh import CIPHER, SshPath, wait_for_master
from bench.rly_stack import ACCOUNT, Approver, approve_session
from tests.fleet.support import Fleet
from tests.peering.support import FleetDb, plain_device
from tests.peering.support import TwoRelays as FleetOfTwo
from tests.relay.device_port_support import new_key
from tests.support.procs import ProcessExited
from tests.support.rly_server import RlyServer
from tests.support.sshd import OpenSshd
from tests.support.technician import Technician

SINGLE, PEERING = "single-node", "peering"
PATHS = [SINGLE, PEERING]
TARGETS = [
    Target("keystroke p50", PEERING, "<=", 1.3, SINGLE),
    Target("upload", PEERING, ">=", 0.8, SINGLE),
    Target("download", PEERING, ">=", 0.8, SINGLE),
]
ADDRESSES = {"relay-a": "127.0.1.1", "relay-b": "127.0.1.2"}


def run(work: Path, scale: Scale, rly: bool) -> LegResult:
    result = LegResult("peering", targets=TARGETS)
    if not rly:
        result.unavailable = dict.fromkeys(PATHS, "--no-rly")
        return result
    try:
        with _fleet_paths(work) as paths:
            for _, name in interleaved(scale.runs, PATHS):
                _measure(result, paths[name], scale)
    except (Unavailable, AssertionError, OSError, ProcessExited) as exc:
        for name in PATHS:
            result.unavailable.setdefault(name, str(exc).splitlines()[0])
    result.notes.append(
        f"{scale.keystrokes} keystrokes and {scale.bulk_bytes // (1024 * 1024)} MiB each way per "
        f"run, {CIPHER}; plain `ssh -R` device on relay-b; technician on relay-b (single-node) "
        "or relay-a (peering)"
    )
    return result


def _measure(result: LegResult, path: SshPath, scale: Scale) -> None:
    rtts, (relay_cpu, _device_cpu) = keystroke.round_trips(path, scale.keystrokes)
    p50 = result.metric("keystroke p50", path.name, "ms", higher_is_better=False)
    p50.samples.append(percentile(rtts, 50))
    p50.raw += rtts
    result.metric("keystroke p99", path.name, "ms", higher_is_better=False).samples.append(
        percentile(rtts, 99)
    )
    result.metric("relay CPU s/1k keys", path.name, "s", higher_is_better=False).samples.append(
        relay_cpu * 1000 / len(rtts)
    )
    for way, fn in (("upload", throughput.upload), ("download", throughput.download)):
        rate, _cpu = fn(path, scale.bulk_bytes)
        result.metric(way, path.name, "MiB/s", higher_is_better=True).samples.append(rate)


@dataclass
class TwoRelays(FleetOfTwo):
    """The fleet of both legs on one PostgreSQL: tracker+portal, relay-a and relay-b."""

    approver: Approver

    @property
    def user_ca(self) -> str:
        return (self.fleet.hub.data_dir / "keys" / "user_ca.pub").read_text().strip()


def two_relays(work: Path, stack: contextlib.ExitStack) -> TwoRelays:
    """A fresh database, tracker+portal, relay-a and relay-b and an approver, stopped by `stack`."""
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    url = _database(stack)
    fleet = Fleet(work, url)
    stack.callback(fleet.stop)
    fleet.cli("account", "add", ACCOUNT)
    for name, address in ADDRESSES.items():
        fleet.add_relay(name, address)
    db = FleetDb(url)
    stack.callback(db.close)
    approver = Approver(fleet.hub)
    stack.callback(approver.close)
    return TwoRelays(fleet, db, approver)


@contextlib.contextmanager
def _fleet_paths(work: Path) -> Iterator[dict[str, SshPath]]:
    """The fleet, the device and one approved ControlMaster per path; all stopped after."""
    with contextlib.ExitStack() as stack:
        world = two_relays(work, stack)
        fleet, db, a, b = world.fleet, world.db, world.a, world.b
        target = OpenSshd(work, trusted_user_ca_keys=[world.user_ca]).start()
        stack.callback(target.stop)
        key = new_key()
        device_id = db.add_named_device(db.account_id(ACCOUNT), hostname="bench-peer", key=key)
        device = plain_device(fleet.processes, b, device_id, key, target.port)
        fleet.wait_online(device_id)
        device_side = tuple(p for p in (device.pid, pid_of(target)) if p)
        paths = {}
        for name, relay, sides in (
            (SINGLE, b, Sides(relay=(pid_of(b),), device=device_side)),
            (PEERING, a, Sides(relay=(pid_of(a), pid_of(b)), device=device_side)),
        ):
            control = work / f"{name}.ctl"
            stack.enter_context(master(relay, world.approver, control))
            paths[name] = _path(name, relay, control, device_id, world.approver, sides)
        yield paths


def _database(stack: contextlib.ExitStack) -> str:
    import psycopg

    from tests.support.pg import fresh_database

    try:
        return stack.enter_context(fresh_database())
    except psycopg.OperationalError as exc:
        raise Unavailable(f"PostgreSQL: {str(exc).strip().splitlines()[0]}") from None


def pid_of(server: RlyServer | OpenSshd) -> int:
    process = server.process
    assert process is not None
    return process.pid


@contextlib.contextmanager
def master(relay: RlyServer, approver: Approver, control: Path) -> Iterator[Technician]:
    """An approved `ssh -M partner@RELAY` (relays listen on their own loopback address)."""
    host = relay.config["relay"]["listen"]
    tech = Technician(
        relay.technician_port,
        host=host,
        options={"Ciphers": CIPHER, "EscapeChar": "none"},
        args=("-M", "-S", str(control)),
        timeout=20,
    )
    try:
        approve_session(tech, approver)
        wait_for_master(control, ("-F", "/dev/null"), f"partner@{host}")
        yield tech
    finally:
        tech.close()


def _path(
    name: str, relay: RlyServer, control: Path, device_id: str, approver: Approver, sides: Sides
) -> SshPath:
    hops = [f"ssh→{relay.config['relay']['node_name']} (technician port): OpenSSH↔asyncssh"]
    if name == PEERING:
        hops.append("relay-a→relay-b (peering port, pooled): asyncssh↔asyncssh")
    hops += [
        "ssh -R device→relay-b (tunnel): OpenSSH↔asyncssh",
        f"relay→device sshd (inside the tunnel): asyncssh↔OpenSSH {CIPHER}",
    ]
    return menu_path(name, relay, control, device_id, approver, sides, tuple(hops))


def menu_path(
    name: str,
    relay: RlyServer,
    control: Path,
    device_id: str,
    approver: Approver,
    sides: Sides,
    hops: tuple[str, ...],
) -> SshPath:
    """`ssh partner@RELAY connect DEVICE 'cmd'` over the approved ControlMaster at `control`."""
    host = relay.config["relay"]["listen"]
    options = ["-F", "/dev/null", "-p", str(relay.technician_port)]
    options += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    options += ["-o", "LogLevel=ERROR", "-o", "EscapeChar=none", "-o", f"Ciphers={CIPHER}"]
    return SshPath(
        name,
        tuple(options),
        (f"partner@{host}", "connect", device_id),
        hops,
        control,
        approver.approve,
        sides,
    )
