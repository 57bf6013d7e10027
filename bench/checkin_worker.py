"""One load-generating process for the check-in leg: signed `POST /api/v1/checkin`, no long poll.

    python -m bench.checkin_worker --url URL --keys keys.json --count N --concurrency C
        --start-at EPOCH --out result.json

Each concurrent task owns its own devices, so one device's requests never
overlap and its timestamps strictly increase, as the tracker's replay check
requires. `wait: 0` asks for an immediate answer. All workers start at
`--start-at`, so their counts add up over one common window.

Each task keeps one HTTP/1.1 keep-alive connection and speaks the protocol
itself (a request is a few writes, a reply a header block and a
Content-Length body): a general client such as httpx cost the load generators
several times the tracker's own CPU per request, so they, not the tracker,
set the pace, and a tracker that is never busy shows a higher cost per
request than it has under load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncssh

from core.signing import sign_request

PATH = "/api/v1/checkin"


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.first_error = ""


class Connection:
    """One keep-alive HTTP/1.1 connection to the tracker (plain http only)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise SystemExit(f"only http:// is supported, not {url}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += [f"Content-Length: {len(body)}", "", ""]
        self.writer.write("\r\n".join(lines).encode("latin-1") + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        length, close = 0, False
        for line in header_lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        reply = await self.reader.readexactly(length)
        if close:
            self.close()
        return int(status_line.split()[1]), reply

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def task(
    url: str, devices: list[tuple[str, asyncssh.SSHKey]], count: int, tally: Tally
) -> None:
    client = Connection(url)
    try:
        await run_task(client, devices, count, tally)
    finally:
        client.close()


async def run_task(
    client: Connection, devices: list[tuple[str, asyncssh.SSHKey]], count: int, tally: Tally
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
        await signed_checkin(client, device_id, key, body, last, tally)


async def signed_checkin(
    client: Connection,
    device_id: str,
    key: asyncssh.SSHKey,
    body: bytes,
    last: dict[str, int],
    tally: Tally,
) -> bool:
    """POST one check-in signed as the device (a fresh timestamp per device); count it."""
    stamp = max(time.time_ns() // 1_000_000, last.get(device_id, 0) + 1)
    last[device_id] = stamp
    headers = sign_request(
        key=key, device_id=device_id, method="POST", path=PATH, body=body, timestamp_ms=stamp
    )
    headers["Content-Type"] = "application/json"
    status, reply = await client.post(PATH, body, headers)
    if status == 200:
        tally.ok += 1
        return True
    tally.errors[str(status)] = tally.errors.get(str(status), 0) + 1
    tally.first_error = tally.first_error or reply.decode(errors="replace")[:200]
    return False


async def main_async(
    args: argparse.Namespace, devices: list[tuple[str, asyncssh.SSHKey]]
) -> dict[str, Any]:
    groups = [devices[i :: args.concurrency] for i in range(args.concurrency)]
    per_task, extra = divmod(args.count, args.concurrency)
    tally = Tally()
    await asyncio.sleep(max(args.start_at - time.time(), 0))
    start = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(
            *(
                task(args.url, g, per_task + (1 if i < extra else 0), tally)
                for i, g in enumerate(groups)
                if g
            )
        ),
        args.timeout,
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
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after (s)")
    args = parser.parse_args()
    entries = json.loads(Path(args.keys).read_text())
    devices = [(d, asyncssh.import_private_key(k)) for d, k in entries]
    Path(args.out).write_text(json.dumps(asyncio.run(main_async(args, devices))))


if __name__ == "__main__":
    main()
