"""Loopback port helpers.

Prefer letting the server bind port 0 and report its port: `free_port()` binds
port 0, closes it and returns the number, so another process may take it before
the caller binds it. Use it only where a program cannot report its own port,
and retry on "Address already in use".
"""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free a moment ago on `host` (racy, see module doc)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return whether a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port accepts TCP connections; raise TimeoutError if it does not."""
    deadline = time.monotonic() + timeout
    while not port_accepts(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout:g}s")
        time.sleep(0.05)
