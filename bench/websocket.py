"""The WebSocket transport against the raw SSH tunnel, in the same run on the same relay.

One `rly serve` with its own TLS certificate and one device sshd; two real
rly-clients reach it, one over the raw SSH device port (`ssh`) and one over
`wss://…/api/v1/tunnel` on the HTTPS port (`wss`). Through one approved
technician connection, `connect DEV` runs the keystroke and bulk legs' own
measurements on both paths, interleaved. Idle cost: N simulated devices
(`bench.ws_sim`, dialling as rly-client does) hold idle tunnels over one
transport, then the other, while the relay sends keepalives every 2 s; the
relay's CPU above its idle level, per tunnel, is compared.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from bench import keystroke, throughput
from bench.common import LegResult, MiB, Scale, Target, Unavailable, interleaved, percentile
from bench.idle_tunnels import cpu_seconds
from bench.openssh import ClientKey, SshPath, start_sshd
from bench.rly_stack import (
    ACCOUNT,
    Approver,
    cli,
    create_devices,
    rly_client_argv,
    rly_path,
    start_server,
    technician_master,
)
from core.tls_identity import file_fingerprint
from tests.support.procs import ManagedProcess
from tests.support.rly_server import RlyServer
from tests.transport.support import self_signed

KEEPALIVE = 2.0
TARGETS = [
    Target("p50", "wss", "<=", 1.1, "ssh"),
    Target("upload", "wss", ">=", 0.9, "ssh"),
    Target("download", "wss", ">=", 0.9, "ssh"),
    Target("idle CPU per tunnel", "wss", "<=", 1.2, "ssh"),
]


def run(work: Path, scale: Scale, rly: bool) -> LegResult:
    result = LegResult("websocket", targets=TARGETS)
    if not rly:
        result.unavailable["wss"] = "--no-rly"
        return result
    with ExitStack() as stack:
        try:
            measure(work, stack, scale, result)
        except Unavailable as exc:
            result.unavailable["wss"] = str(exc)
    return result


def measure(work: Path, stack: ExitStack, scale: Scale, result: LegResult) -> None:
    cert, key = self_signed(work, "relay-cert", ("127.0.0.1", "localhost"))
    config = {
        "http": {"tls_cert": str(cert), "tls_key": str(key)},
        # the simulated devices all dial from 127.0.0.1
        "relay": {"keepalive_interval": f"{KEEPALIVE:g}s", "max_unauthenticated_per_source": 1024},
    }
    server = start_server(work, stack, config)
    pin = file_fingerprint(cert)
    user_ca = (server.data_dir / "keys" / "user_ca.pub").read_text().strip()
    sshd = start_sshd(work, stack, ClientKey(work), [user_ca])
    approver = Approver(server)
    stack.callback(approver.close)
    approver.method = "database"  # approval time is not measured here (see the approval leg)
    ws = server.base_url.replace("https://", "wss://") + "/api/v1/tunnel"
    ssh_dev = enroll(server, work, stack, sshd.port, "bench-ssh", pin, None)
    wss_dev = enroll(server, work, stack, sshd.port, "bench-wss", pin, ws)
    control = work / "mux-ws"
    stack.enter_context(technician_master(server, approver, control))
    paths = {
        name: rly_path(name, server, control, dev, approver, data=False, target="sshd")
        for name, dev in (("ssh", ssh_dev), ("wss", wss_dev))
    }
    interactive(paths, scale, result)
    idle(server, work, stack, scale, result, ws, pin)
    result.notes.append(
        f"same relay (TLS), same device sshd; {scale.keystrokes} keystrokes and "
        f"{scale.bulk_bytes // MiB} MiB each way per run; idle: relay keepalive every "
        f"{KEEPALIVE:g}s"
    )


def enroll(
    server: RlyServer,
    work: Path,
    stack: ExitStack,
    target_port: int,
    name: str,
    pin: str,
    endpoint: str | None,
) -> tuple[str, int]:
    """A real rly-client pinned to the relay's certificate, on one endpoint if given."""
    out = cli(server, "enroll-token", "create", "--account", ACCOUNT, "--auto-accept")
    token = re.search(r"token (\S+)", out)
    if token is None:
        raise Unavailable("enroll-token create printed no token")
    config = work / f"{name}.toml"
    argv = [*rly_client_argv(), "enroll", "--tracker", server.base_url, "--token", token.group(1)]
    argv += ["--config", str(config), "--target-port", str(target_port), "--hostname", name]
    argv += ["--tracker-fingerprint", pin]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise Unavailable(f"rly-client enroll: {done.stderr.strip()[-200:]}")
    if endpoint is not None:
        config.write_text(config.read_text() + f'relay_endpoints = ["{endpoint}"]\n')
    proc = ManagedProcess([*rly_client_argv(), "run", "--config", str(config)], workdir=work)
    stack.callback(proc.stop)
    proc.start()
    try:
        proc.wait_for_line(r"tunnel up ", 30, stream="stderr")
    except (TimeoutError, AssertionError, RuntimeError) as exc:
        raise Unavailable(f"{name}: no tunnel: {str(exc).splitlines()[0]}") from None
    found = re.search(r'device_id\s*=\s*"([^"]+)"', config.read_text())
    if found is None:
        raise Unavailable("rly-client config has no device_id")
    return found.group(1), proc.pid


def interactive(paths: dict[str, SshPath], scale: Scale, result: LegResult) -> None:
    for _, name in interleaved(scale.runs, list(paths)):
        path = paths[name]
        rtts, _cpu_used = keystroke.round_trips(path, scale.keystrokes)
        p50 = result.metric("p50", name, "ms", higher_is_better=False)
        p50.samples.append(percentile(rtts, 50))
        p50.raw += rtts
        up, _ = throughput.upload(path, scale.bulk_bytes)
        down, _ = throughput.download(path, scale.bulk_bytes)
        result.metric("upload", name, "MiB/s", higher_is_better=True).samples.append(up)
        result.metric("download", name, "MiB/s", higher_is_better=True).samples.append(down)


def idle(
    server: RlyServer,
    work: Path,
    stack: ExitStack,
    scale: Scale,
    result: LegResult,
    ws: str,
    pin: str,
) -> None:
    """Relay CPU per idle tunnel above its idle level, for N tunnels on each transport."""
    count = 20 if scale.smoke else 300
    window = 4.0 if scale.smoke else 30.0
    assert server.process is not None
    pid = server.process.pid
    ca = server.data_dir / "keys" / "host_ca.pub"
    ssh = f"ssh://127.0.0.1:{server.device_port}"
    for run_no, name in interleaved(scale.runs, ["ssh", "wss"]):
        quiet = _cpu(pid, window)
        ids = [f"{name[0]}{run_no:02d}{i:07d}" for i in range(count)]  # 10 characters
        keys = work / f"idle-{name}-{run_no}.json"
        keys.write_text(json.dumps([[d, k.export_private_key().decode()] for d, k in
                                    create_devices(server, ids)]))  # fmt: skip
        status = work / f"idle-{name}-{run_no}.status"
        argv = [sys.executable, "-m", "bench.ws_sim", "--endpoint", ws if name == "wss" else ssh]
        argv += ["--keys", str(keys), "--ca", str(ca), "--status", str(status)]
        sim = ManagedProcess([*argv, "--fingerprint", pin], workdir=work, name=f"sim-{name}")
        sim.start()
        try:
            _wait_up(status, count, sim)
            time.sleep(KEEPALIVE)
            busy = _cpu(pid, window)
        finally:
            sim.stop()
        metric = result.metric("idle CPU per tunnel", name, "µs/s", higher_is_better=False)
        metric.samples.append(max(busy - quiet, 0.0) / count * 1e6)


def _cpu(pid: int, window: float) -> float:
    """CPU seconds per second of `pid` over `window`."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


def _wait_up(status: Path, count: int, sim: ManagedProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(status.read_text())["up"] >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        if not sim.running:
            raise Unavailable(f"simulated devices exited: {sim.stderr.strip()[-200:]}")
        time.sleep(0.2)
    raise Unavailable(f"{count} idle tunnels not up within {timeout:g}s")
