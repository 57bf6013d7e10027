"""Algorithms and limits shared by every SSH endpoint of the relay.

Only modern algorithms are offered (no ssh-rsa SHA-1, no group14-sha1, no
DSA); AES-GCM is preferred because it costs about half the CPU of ChaCha20 here.
"""

from __future__ import annotations

KEX_ALGS = [
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
]
ENCRYPTION_ALGS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
MAC_ALGS = [
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
]
SIGNATURE_ALGS = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
]
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
