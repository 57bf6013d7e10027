"""Leg 3: time from `connect DEVICE` to the device's shell prompt, against a ProxyJump login.

rly: in the approved technician session already at the menu (tunnel up),
type `connect DEVICE` and wait for the device shell's prompt, then `exit` back
to the menu. Baseline: a whole OpenSSH ProxyJump login to the same sshd, from
starting `ssh -J` to the same prompt; that is what a technician waits for
without rly. Both end at the same bash prompt on the same sshd.
"""

from __future__ import annotations

import time

import pexpect

from bench.common import LegResult, Scale, Target, Unavailable, interleaved
from bench.openssh import SSH, SshPath
from bench.rly_stack import DEVICE_PROMPT, MENU_PROMPT
from bench.topology import Topology
from tests.support.technician import Technician

TARGETS = [Target("connect→prompt", "rly", "<=", 0.5, "proxyjump")]


def run(topo: Topology, scale: Scale) -> LegResult:
    """Alternate ProxyJump logins and rly connects."""
    result = LegResult("connect_time", targets=TARGETS)
    result.notes.append(
        "rly paths: menu `connect` with the tunnel up (rly, rly-builtin: including the data"
        " connection's set-up); baseline: full `ssh -J` login"
    )
    if "rly" in topo.unavailable or topo.menu is None:
        result.unavailable["rly"] = topo.unavailable.get("rly", "no approved technician session")
    for _, name in interleaved(scale.connects, ["proxyjump", *topo.menus]):
        if name in result.unavailable:
            continue
        try:
            if name in topo.menus:
                menu, device_id = topo.menus[name]
                seconds = rly_connect(menu, device_id)
            else:
                seconds = openssh_login(topo.logins["proxyjump"])
        except Unavailable as exc:
            result.unavailable[name] = str(exc)
            continue
        metric = result.metric("connect→prompt", name, "ms", higher_is_better=False)
        metric.samples.append(seconds * 1000)
    return result


def openssh_login(path: SshPath) -> float:
    """Seconds from starting `ssh -J … -tt` to the device's shell prompt."""
    argv = [SSH, *path.options, "-tt", *path.dest]
    start = time.perf_counter()
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=30, dimensions=(24, 80))
    try:
        child.expect(DEVICE_PROMPT)
        elapsed = time.perf_counter() - start
        child.sendline("exit")
        child.expect(pexpect.EOF)
    except (pexpect.TIMEOUT, pexpect.EOF):
        raise Unavailable(f"{path.name} login: no shell prompt: {child.before!r:.200}") from None
    finally:
        child.close(force=True)
    return elapsed


def rly_connect(menu: Technician, device_id: str) -> float:
    """Seconds from typing `connect DEVICE` at the menu to the device's shell prompt."""
    try:
        start = time.perf_counter()
        menu.sendline(f"connect {device_id}")
        menu.expect(DEVICE_PROMPT, timeout=30)
        elapsed = time.perf_counter() - start
        menu.sendline("exit")
        menu.expect(MENU_PROMPT)
    except AssertionError as exc:
        raise Unavailable(f"connect: {str(exc).splitlines()[0]}") from None
    return elapsed
