"""rly-client: the device side of rly (enroll, check in, hold the tunnel).

Runs on appliances, so it imports only the stdlib, asyncssh, httpx, tomli_w
and core.signing: never the server packages.
"""

__version__ = "0.1.0"
