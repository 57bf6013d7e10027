"""Just enough of the SSH wire format to misbehave before encryption starts (RFC 4253).

sock = RawSsh.connect(port)            # exchanges version lines
offer = sock.server_kexinit()          # the server's algorithm name-lists
sock.send_packet(bytes([2]) + ...)     # any unencrypted packet
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

MSG_IGNORE = 2
MSG_KEXINIT = 20
MSG_GLOBAL_REQUEST = 80
MSG_CHANNEL_OPEN = 90
KEXINIT_FIELDS = (
    "kex",
    "host_key",
    "enc_c2s",
    "enc_s2c",
    "mac_c2s",
    "mac_s2c",
    "comp_c2s",
    "comp_s2c",
)
CLIENT_VERSION = b"SSH-2.0-rly_adversary_1.0\r\n"


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def name_list(names: list[str]) -> bytes:
    return string(",".join(names).encode())


def packet(payload: bytes, block: int = 8) -> bytes:
    """An unencrypted binary packet: length, padding length, payload, random padding."""
    pad = block - (len(payload) + 5) % block
    if pad < 4:
        pad += block
    return struct.pack(">IB", len(payload) + pad + 1, pad) + payload + os.urandom(pad)


def client_kexinit(kex: list[str]) -> bytes:
    lists = [
        kex,
        ["ssh-ed25519"],
        ["aes128-ctr"],
        ["aes128-ctr"],
        ["hmac-sha2-256"],
        ["hmac-sha2-256"],
        ["none"],
        ["none"],
        [],
        [],
    ]
    return (
        bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(map(name_list, lists)) + b"\0" + b"\0" * 4
    )


@dataclass
class RawSsh:
    sock: socket.socket
    server_version: bytes

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> RawSsh:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.sendall(CLIENT_VERSION)
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError("closed before the version line")
            line += chunk
        return cls(sock, line.rstrip(b"\r\n"))

    def close(self) -> None:
        self.sock.close()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        return data

    def read_packet(self) -> bytes:
        length, pad = struct.unpack(">IB", self._exact(5))
        body = self._exact(length - 1)
        return body[: length - 1 - pad]

    def send_packet(self, payload: bytes) -> None:
        self.sock.sendall(packet(payload))

    def server_kexinit(self) -> dict[str, list[str]]:
        payload = self.read_packet()
        assert payload[0] == MSG_KEXINIT, payload[:1]
        pos, lists = 17, {}
        for name in KEXINIT_FIELDS:
            (n,) = struct.unpack(">I", payload[pos : pos + 4])
            lists[name] = payload[pos + 4 : pos + 4 + n].decode().split(",")
            pos += 4 + n
        return lists

    def closed_within(self, timeout: float) -> bool:
        """True if the server closes the connection within `timeout` (data is discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionError:
                return True
        return False
