"""One load-generating process for the check-in leg: signed `POST /api/v1/checkin`, no long poll.

    python -m bench.checkin_worker --url URL --keys keys.json --count N --concurrency C
        --start-at EPOCH --out result.json

Each concurrent task owns its own devices, so one device's requests never
overlap and its timestamps strictly increase, as the tracker's replay check
requires. `wait: 0` asks for an immediate answer. All workers start at
`--start-at`, so their counts add up over one common window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncssh
import httpx

from core.signing import sign_request

PATH = "/api/v1/checkin"


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.first_error = ""


async def task(
    client: httpx.AsyncClient, devices: list[tuple[str, asyncssh.SSHKey]], count: int, tally: Tally
) -> None:
    last: dict[str, int] = {}
    for i in range(count):
        device_id, key = devices[i % len(devices)]
        body = json.dumps(
            {
                "device_id": device_id,
                "client_version": "bench",
                "os_name": "linux",
                "os_version": "bench",
                "uptime": float(i),
                "tunnel": {"state": "down", "relay": None, "port": None, "since": None},
                "wait": 0,
            }
        ).encode()
        stamp = max(time.time_ns() // 1_000_000, last.get(device_id, 0) + 1)
        last[device_id] = stamp
        headers = sign_request(
            key=key, device_id=device_id, method="POST", path=PATH, body=body, timestamp_ms=stamp
        )
        headers["Content-Type"] = "application/json"
        reply = await client.post(PATH, content=body, headers=headers)
        if reply.status_code == 200:
            tally.ok += 1
        else:
            tally.errors[str(reply.status_code)] = tally.errors.get(str(reply.status_code), 0) + 1
            tally.first_error = tally.first_error or reply.text[:200]


async def main_async(
    args: argparse.Namespace, devices: list[tuple[str, asyncssh.SSHKey]]
) -> dict[str, Any]:
    groups = [devices[i :: args.concurrency] for i in range(args.concurrency)]
    per_task, extra = divmod(args.count, args.concurrency)
    tally = Tally()
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=30) as client:
        await asyncio.sleep(max(args.start_at - time.time(), 0))
        start = time.perf_counter()
        await asyncio.gather(
            *(
                task(client, g, per_task + (1 if i < extra else 0), tally)
                for i, g in enumerate(groups)
                if g
            )
        )
        elapsed = time.perf_counter() - start
    return {
        "ok": tally.ok,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--keys", required=True, help="JSON [[device_id, private key]]")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    entries = json.loads(Path(args.keys).read_text())
    devices = [(d, asyncssh.import_private_key(k)) for d, k in entries]
    Path(args.out).write_text(json.dumps(asyncio.run(main_async(args, devices))))


if __name__ == "__main__":
    main()
