"""Simulated devices for the idle-tunnel leg: one process holding many device tunnels.

    python -m bench.sim_device --port P --keys keys.json --ca host_ca.pub --status s.json

Each device connects as rly-client does (same algorithms, keepalive default,
pinned host CA, `Backoff` with full jitter from device_client.tunnel), asks
for one remote forward, and on loss reconnects the way rly-client's runner
does: after a failed attempt it waits `next_delay()`; after an established
tunnel drops it waits `after_drop()` (uniform over 40 s, so a relay
restart does not bring the whole fleet back as one herd); the backoff starts
again from the base only after a tunnel stayed up `STABLE_AFTER`. Each device dials from its
own loopback address (127.x.y.z) so the relay's per-source limit on
unauthenticated connections sees what a fleet behind many NATs would show.
Counts go to a JSON status file twice a second for the parent to poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncssh

from core.ssh_algorithms import ENCRYPTION_ALGS, KEX_ALGS, MAC_ALGS
from device_client.keepalive import keepalive_options
from device_client.tunnel import STABLE_AFTER, Backoff

KEEPALIVE = keepalive_options(30.0, 3)  # rly-client's defaults, mapped as rly-client maps them


@dataclass
class Counts:
    """What the parent reads: tunnels up now, successful connects so far, refusals."""

    up: int = 0
    connects: int = 0
    attempts: int = 0
    denied: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def device(
    device_id: str, key: asyncssh.SSHKey, source: str, args: argparse.Namespace, counts: Counts
) -> None:
    """Hold one tunnel forever, reconnecting with backoff like rly-client's runner."""
    backoff = Backoff()
    while True:
        counts.attempts += 1
        up_since: float | None = None
        try:
            conn = await asyncssh.connect(
                "127.0.0.1",
                args.port,
                local_addr=(source, 0),
                username=device_id,
                client_keys=[key],
                known_hosts=([], [args.ca_key], []),
                config=None,
                agent_path=None,
                password=None,
                kbdint_auth=False,
                preferred_auth=["publickey"],
                keepalive_interval=KEEPALIVE[0],
                keepalive_count_max=KEEPALIVE[1],
                connect_timeout=30,
                kex_algs=KEX_ALGS,
                encryption_algs=ENCRYPTION_ALGS,
                mac_algs=MAC_ALGS,
                compression_algs=None,
            )
            async with conn:
                await conn.forward_remote_port("", 0, "127.0.0.1", 9)
                counts.up += 1
                counts.connects += 1
                up_since = time.monotonic()
                try:
                    await conn.wait_closed()
                finally:
                    counts.up -= 1
        except asyncssh.PermissionDenied:
            counts.denied += 1
        except (OSError, asyncssh.Error) as exc:
            name = type(exc).__name__
            counts.errors[name] = counts.errors.get(name, 0) + 1
        if up_since is None:
            await asyncio.sleep(backoff.next_delay())
            continue
        if time.monotonic() - up_since >= STABLE_AFTER:
            backoff.reset()
        await asyncio.sleep(backoff.after_drop())


def _replace(path: Path, data: str) -> None:
    """Write atomically so the parent never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


async def report(path: Path, counts: Counts) -> None:
    while True:
        data = json.dumps({**asdict(counts), "time": time.time()})
        await asyncio.to_thread(_replace, path, data)
        await asyncio.sleep(0.5)


async def main_async(args: argparse.Namespace, entries: list[list[str]]) -> None:
    counts = Counts()
    tasks = [asyncio.create_task(report(Path(args.status), counts))]
    for device_id, key_text, source in entries:
        key = asyncssh.import_private_key(key_text)
        tasks.append(asyncio.create_task(device(device_id, key, source, args, counts)))
        await asyncio.sleep(args.spread / max(len(entries), 1))
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", required=True, help="JSON [[device_id, private key, source ip]]")
    parser.add_argument("--ca", required=True, help="the relay's host CA public key file")
    parser.add_argument("--status", required=True)
    parser.add_argument("--spread", type=float, default=0.0, help="seconds over which to start")
    args = parser.parse_args()
    args.ca_key = asyncssh.import_public_key(Path(args.ca).read_text())
    asyncio.run(main_async(args, json.loads(Path(args.keys).read_text())))


if __name__ == "__main__":
    main()
