"""The data-connection wire contract shared by the relay and rly-client (docs/architecture.md).

- A device that can dial data connections says so with the word CAPABILITY
  in the comments of its SSH version string (`SSH-2.0-AsyncSSH_2.24.1 ...
  rly-data=1`); any other client, OpenSSH above all, is never sent a control
  channel.
- The relay asks it to dial by opening a channel back through the forward
  with originator host CONTROL_HOST and writing one JSON object (the dial
  request) and a newline; the same object may come as an element of a
  check-in answer's `dials` list. `"endpoints_only": true` (a dial-back to
  another relay node, relay.peering.dial_back) means: try only the listed
  endpoints, not the one the tunnel uses.
- The device opens a stream to one of the request's endpoints and sends
  `RLY-DATA/1 <ticket>\\r\\n` (at most PREAMBLE_MAX bytes) within
  PREAMBLE_TIMEOUT; the relay answers OK_LINE, then the stream carries SSH
  with the relay as client and the device's target as server.
"""

from __future__ import annotations

CAPABILITY = "rly-data=1"
CONTROL_HOST = "rly-control"
PREAMBLE_PREFIX = b"RLY-DATA/1 "
PREAMBLE_MAX = 128
PREAMBLE_TIMEOUT = 5.0
OK_LINE = b"OK\r\n"
REQUEST_VERSION = 1
REQUEST_MAX = 4096  # bytes of one dial request on the control channel


def data_capable(client_version: str) -> bool:
    """rly-client announces data connections in its version string; OpenSSH never gets one."""
    words = client_version.split()
    return CAPABILITY in words[1:] and not words[0].startswith("SSH-2.0-OpenSSH")
