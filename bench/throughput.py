"""Leg 1: bulk throughput up and down, every path back to back in each run.

Up: the device runs `printf BENCH-GO; cat > /dev/null; printf BENCH-END`.
The clock starts at GO (the remote `cat` is running) and stops at END (it
has read everything), so process start-up, session teardown and, on rly, the
per-session approval are not counted on any path. On this VM sshd takes
~250 ms to start a command: ~15% of a 256 MiB upload if it were counted.
Down: the device runs `printf BENCH-GO; head -c N /dev/zero`; the clock runs
from GO to EOF.
No PTY: bulk data must not pass a line discipline.
"""

from __future__ import annotations

import subprocess
import time

from bench.common import LegResult, MiB, Scale, Target, Unavailable, interleaved
from bench.openssh import SshPath
from bench.stream import StderrWatcher, read_some, read_until
from bench.topology import Topology

CHUNK = 1 * MiB
GO, END = b"BENCH-GO", b"BENCH-END"
START_TIMEOUT = 60.0  # session start, and on rly the approval
STALL_TIMEOUT = 60.0  # longest pause in a download
TRANSFER_TIMEOUT = 900.0
GiB = 1024 * MiB
TARGETS = [
    Target("upload", "rly", ">=", 1.2, "reverse"),
    Target("download", "rly", ">=", 1.2, "reverse"),
    Target("relay CPU s/GiB up", "rly", "<=", 1.5, "reverse"),
    Target("relay CPU s/GiB down", "rly", "<=", 1.5, "reverse"),
]


def run(topo: Topology, scale: Scale) -> LegResult:
    """Measure upload and download on every available path, interleaved."""
    result = LegResult("throughput", targets=TARGETS, unavailable=dict(topo.unavailable))
    size = scale.bulk_bytes
    result.notes.append(
        f"{size // MiB} MiB per transfer; each is a new session on the path's ControlMaster"
    )
    for _, name in interleaved(scale.runs, list(topo.paths)):
        if name in result.unavailable:
            continue
        path = topo.paths[name]
        try:
            up, up_cpu = upload(path, size)
            down, down_cpu = download(path, size)
        except Unavailable as exc:
            result.unavailable[name] = str(exc)
            continue
        result.metric("upload", name, "MiB/s", higher_is_better=True).samples.append(up)
        result.metric("download", name, "MiB/s", higher_is_better=True).samples.append(down)
        _cpu(result, path, "up", up_cpu, size)
        _cpu(result, path, "down", down_cpu, size)
    return result


def _cpu(result: LegResult, path: SshPath, way: str, cpu: tuple[float, float], size: int) -> None:
    """CPU seconds per GiB of the path's relay side and device side (bench.cpu)."""
    for side, pids, seconds in (
        ("relay", path.sides.relay, cpu[0]),
        ("device", path.sides.device, cpu[1]),
    ):
        if pids:
            metric = result.metric(
                f"{side} CPU s/GiB {way}", path.name, "s", higher_is_better=False
            )
            metric.samples.append(seconds * GiB / size)


def upload(path: SshPath, size: int) -> tuple[float, tuple[float, float]]:
    """MiB/s of `size` bytes piped into `cat > /dev/null` on the device, timed by its markers,
    and the relay and device sides' CPU seconds between the markers."""
    block = bytes(CHUNK)
    proc = _start(path, f"printf {GO.decode()}; cat > /dev/null; printf {END.decode()}", True)
    errors = StderrWatcher(proc.stderr, path.approve)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        read_until(proc.stdout.fileno(), GO, timeout=START_TIMEOUT, approve=path.approve)
        cpu0 = path.sides.read()
        start = time.perf_counter()
        for offset in range(0, size, CHUNK):
            proc.stdin.write(block[: min(CHUNK, size - offset)])
        proc.stdin.close()
        read_until(proc.stdout.fileno(), END, timeout=TRANSFER_TIMEOUT)
        elapsed = time.perf_counter() - start
        cpu1 = path.sides.read()
        code = proc.wait(timeout=60)
    except BrokenPipeError:
        raise Unavailable(f"{path.name}: ssh stopped reading: {errors.tail()}") from None
    finally:
        _end(proc)
    _check(path, code, errors)
    return size / MiB / elapsed, (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def download(path: SshPath, size: int) -> tuple[float, tuple[float, float]]:
    """MiB/s of reading `size` zero bytes the device writes with `head -c` after its marker,
    and the relay and device sides' CPU seconds from the marker to the last byte."""
    proc = _start(path, f"printf {GO.decode()}; head -c {size} /dev/zero", False)
    errors = StderrWatcher(proc.stderr, path.approve)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        received = len(read_until(fd, GO, timeout=START_TIMEOUT, approve=path.approve))
        cpu0 = path.sides.read()
        start = time.perf_counter()
        while received < size:
            received += len(read_some(fd, STALL_TIMEOUT, what=b"the rest of the data"))
        elapsed = time.perf_counter() - start
        cpu1 = path.sides.read()
        code = proc.wait(timeout=60)
    finally:
        _end(proc)
    _check(path, code, errors)
    if received != size:
        raise Unavailable(f"{path.name}: download delivered {received} of {size} bytes")
    return size / MiB / elapsed, (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def _start(path: SshPath, remote: str, stdin: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        path.command(remote),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _check(path: SshPath, code: int, errors: StderrWatcher) -> None:
    if code != 0:
        raise Unavailable(f"{path.name}: ssh exited {code}: {errors.tail()}")
