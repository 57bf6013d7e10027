"""Algorithms (core.ssh_algorithms) and limits shared by every SSH endpoint of the relay."""

from __future__ import annotations

from core.ssh_algorithms import ENCRYPTION_ALGS, KEX_ALGS, MAC_ALGS, SIGNATURE_ALGS

HOST_KEY_ALGS = ["ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519"]
COMPRESSION_ALGS = ["none"]
WINDOW = 2 * 1024 * 1024
MAX_PACKET = 32768


def algorithm_options() -> dict[str, object]:
    """Keyword arguments for asyncssh.listen / asyncssh.connect."""
    return {
        "kex_algs": KEX_ALGS,
        "encryption_algs": ENCRYPTION_ALGS,
        "mac_algs": MAC_ALGS,
        "signature_algs": SIGNATURE_ALGS,
        "compression_algs": COMPRESSION_ALGS,
    }
