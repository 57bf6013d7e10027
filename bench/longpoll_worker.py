"""Load generator for the on-demand fleet leg: signed long-poll check-ins, as rly-client sends them.

    python -m bench.longpoll_worker --url URL --seed S --first N --count M --concurrency C
        --wait W (--passes P | --duration D) --start-at EPOCH --out result.json

Device keys are derived from (seed, index), so the parent inserts 100,000 rows
and each worker re-creates only the private keys of its own devices, without
a 100,000-key file. Device `i` is `od` + i in eight digits. Each concurrent
task owns a slice of the devices and one keep-alive HTTP/1.1 connection
(bench.checkin_worker's client) and checks its devices in one after another
with `wait: W`, the long poll rly-client sends (tunnel down, ack 0 after the
first answer, as rly-client's runner). The tracker must be configured with
`tracker.checkin_wait = W`, so each check-in is a whole long poll: recorded,
held for W seconds on the hub, re-read, answered. C tasks thus hold C long
polls and check in about C / W devices per second.

`--passes P`: every device checks in P times, then the worker exits (the
first pass after a tracker start is the cold one: no cached key). `--duration
D`: cycle until D seconds after the start, then finish the polls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import asyncssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.checkin_worker import Connection, Tally, signed_checkin


def device_id(index: int) -> str:
    """The bench's device id for index `index` (10 lower-case letters or digits)."""
    return f"od{index:08d}"


def _private(seed: str, index: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(f"{seed}\n{index}".encode()).digest()
    )


def public_key_text(seed: str, index: int) -> str:
    """The OpenSSH public key line of device `index` (what the devices table stores)."""
    public = _private(seed, index).public_key()
    raw = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode("ascii")


def private_key(seed: str, index: int) -> asyncssh.SSHKey:
    """Device `index`'s private key as the signing code takes it."""
    pem = _private(seed, index).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return asyncssh.import_private_key(pem)


def checkin_body(device: str, n: int, wait: float, acked: bool) -> bytes:
    body: dict[str, Any] = {
        "device_id": device,
        "client_version": "bench",
        "os_name": "linux",
        "os_version": "bench",
        "uptime": float(n),
        "tunnel": {"state": "down", "relay": None, "port": None, "since": None},
        "wait": wait,
    }
    if acked:
        body["ack"] = 0
    return json.dumps(body).encode()


async def task(
    args: argparse.Namespace,
    devices: list[tuple[str, asyncssh.SSHKey]],
    offset: float,
    deadline: float | None,
    tally: Tally,
) -> None:
    """Check this slice's devices in one after another: `passes` times, or until `deadline`."""
    client = Connection(args.url)
    last: dict[str, int] = {}
    await asyncio.sleep(offset)  # spread the tasks over one wait, so answers come evenly
    try:
        n = 0
        total = len(devices) * args.passes if deadline is None else None
        while (total is None or n < total) and (deadline is None or time.time() < deadline):
            device, key = devices[n % len(devices)]
            body = checkin_body(device, n, args.wait, device in last)
            if not await signed_checkin(client, device, key, body, last, tally):
                await asyncio.sleep(args.wait)  # a refused poll returns at once: do not spin
            n += 1
    finally:
        client.close()


async def main_async(
    args: argparse.Namespace, devices: list[tuple[str, asyncssh.SSHKey]]
) -> dict[str, Any]:
    tasks = min(args.concurrency, len(devices))
    groups = [devices[i::tasks] for i in range(tasks)]
    tally = Tally()
    await asyncio.sleep(max(args.start_at - time.time(), 0))
    start = time.perf_counter()
    deadline = None if args.duration is None else time.time() + args.duration
    await asyncio.wait_for(
        asyncio.gather(
            *(
                task(args, group, args.wait * i / tasks, deadline, tally)
                for i, group in enumerate(groups)
            )
        ),
        args.timeout,
    )
    return {
        "ok": tally.ok,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--seed", required=True, help="derives each device's key")
    parser.add_argument("--first", type=int, required=True, help="first device index")
    parser.add_argument("--count", type=int, required=True, help="devices from --first on")
    parser.add_argument("--concurrency", type=int, default=100, help="long polls held at once")
    parser.add_argument("--wait", type=float, required=True, help="long-poll wait (s)")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--duration", type=float, help="cycle for this long instead of passes")
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    args = parser.parse_args()
    indexes = range(args.first, args.first + args.count)
    devices = [(device_id(i), private_key(args.seed, i)) for i in indexes]
    Path(args.out).write_text(json.dumps(asyncio.run(main_async(args, devices))))


if __name__ == "__main__":
    main()
