"""Idle device tunnels for the WebSocket leg: one process holding N tunnels over one transport.

    python -m bench.ws_sim --endpoint ws://127.0.0.1:P/api/v1/tunnel --keys keys.json \
        --ca host_ca.pub --status s.json [--fingerprint SHA256:...]

Each tunnel is dialled exactly as rly-client dials (`device_client.dialer.dial_endpoint`:
same algorithms, pinned host CA and TLS pin, the WebSocket transport for
ws/wss endpoints) and asks for one remote forward, then stays idle. The count
of tunnels up goes to a JSON status file for the parent to poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import asyncssh

from device_client.config import ClientConfig
from device_client.dialer import describe, dial_endpoint
from device_client.endpoints import parse_endpoint


async def hold(config: ClientConfig, key: asyncssh.SSHKey, endpoint: str, up: list[int]) -> None:
    try:
        dialled = await dial_endpoint(config, key, parse_endpoint(endpoint))
    except (OSError, asyncssh.Error) as exc:
        print(f"ws_sim: {config.device_id}: {describe(exc)}", file=sys.stderr, flush=True)
        raise
    async with dialled.conn:
        await dialled.conn.forward_remote_port("", 0, "127.0.0.1", 9)
        up[0] += 1
        await dialled.conn.wait_closed()
        up[0] -= 1


async def main_async(args: argparse.Namespace, ca: str, entries: list[list[str]]) -> None:
    up = [0]
    tasks = []
    for device_id, key_text in entries:
        config = ClientConfig(
            tracker_url="http://127.0.0.1:9",
            device_id=device_id,
            key_file=Path("/nonexistent"),
            relay_hosts=("127.0.0.1",),
            relay_ports=(9,),
            relay_host_ca=ca,
            user_ca=ca,
            state_file=Path("/nonexistent"),
            tls_fingerprint=args.fingerprint,
        )
        key = asyncssh.import_private_key(key_text)
        tasks.append(asyncio.create_task(hold(config, key, args.endpoint, up)))
        await asyncio.sleep(0.005)
    while True:
        status = json.dumps({"up": up[0], "failed": sum(t.done() for t in tasks)})
        await asyncio.to_thread(_replace, Path(args.status), status)
        await asyncio.sleep(0.5)


def _replace(path: Path, data: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--keys", required=True, help="JSON [[device_id, private key]]")
    parser.add_argument("--ca", required=True, help="the relay's host CA public key file")
    parser.add_argument("--status", required=True)
    parser.add_argument("--fingerprint", default="", help="TLS pin for wss endpoints")
    args = parser.parse_args()
    ca = Path(args.ca).read_text().strip()
    asyncio.run(main_async(args, ca, json.loads(Path(args.keys).read_text())))


if __name__ == "__main__":
    main()
