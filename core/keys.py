"""The relay's keys: host CA, host key + certificate, the user CA, and node peering certificates.

They live in `<data_dir>/keys` (0700), private files 0600. A file that group or
others can read stops start-up with its name, so a leaked copy is noticed
instead of trusted. The host key is kept across restarts; its certificate is
signed again at each start for the current host names.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import asyncssh

HOST_CERT_VALIDITY = "+520w"
USER_CERT_VALIDITY_MINUTES = 5


class KeyFileError(RuntimeError):
    """A key file is missing, unreadable or too open; the message names it."""


def ensure_private_dir(path: Path) -> None:
    """Create (0700) or check a directory that holds secrets."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"directory {path} is accessible by group or others "
            f"(mode {mode:04o}); run: chmod 700 {path}"
        )


def check_secret_file(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"secret file {path} is readable by group or others "
            f"(mode {mode:04o}); run: chmod 600 {path}"
        )


def write_secret(path: Path, data: bytes) -> None:
    """Write a file that is 0600 from its first byte (no window where it is open)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _load_or_generate(path: Path) -> asyncssh.SSHKey:
    if path.exists():
        check_secret_file(path)
        try:
            return asyncssh.read_private_key(str(path))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise KeyFileError(f"key file {path} cannot be read: {exc}") from None
    key = asyncssh.generate_private_key("ssh-ed25519")
    write_secret(path, key.export_private_key())
    (path.parent / f"{path.name}.pub").write_bytes(key.export_public_key())
    return key


@dataclass(frozen=True)
class NodeIdentity:
    """A relay node's peering key, its host certificate and its node client certificate."""

    key: asyncssh.SSHKey
    host_cert: asyncssh.SSHCertificate
    client_cert: asyncssh.SSHCertificate


@dataclass(frozen=True)
class KeyStore:
    host_ca: asyncssh.SSHKey
    host_key: asyncssh.SSHKey
    host_cert: asyncssh.SSHCertificate
    user_ca: asyncssh.SSHKey

    @classmethod
    def load_or_create(cls, data_dir: Path, host_names: list[str]) -> KeyStore:
        ensure_private_dir(data_dir)
        keys_dir = data_dir / "keys"
        ensure_private_dir(keys_dir)
        host_ca = _load_or_generate(keys_dir / "host_ca")
        host_key = _load_or_generate(keys_dir / "host_key")
        user_ca = _load_or_generate(keys_dir / "user_ca")
        host_cert = host_ca.generate_host_certificate(
            host_key,
            "rly-relay",
            principals=sorted(set(host_names)),
            valid_before=HOST_CERT_VALIDITY,
        )
        host_cert.write_certificate(str(keys_dir / "host_key-cert.pub"))
        return cls(host_ca=host_ca, host_key=host_key, host_cert=host_cert, user_ca=user_ca)

    @property
    def host_ca_public(self) -> str:
        return self.host_ca.export_public_key().decode().strip()

    @property
    def user_ca_public(self) -> str:
        return self.user_ca.export_public_key().decode().strip()

    def host_fingerprint(self) -> str:
        return str(self.host_key.get_fingerprint())

    def node_identity(self, node_name: str) -> NodeIdentity:
        """This relay node's peering identity: its host key with two host-CA certificates.

        Relay peering (SPEC 8) authenticates both ends by node name. The server
        side presents a host certificate whose only principal is the node name;
        the client side logs in as the node name with a *user* certificate signed
        by the same host CA (key id `rly-node:<name>`, principal the node name,
        no permissions). Devices trust only the user CA, so a node certificate
        opens no device; technicians' certificates come from the user CA, so none
        of them opens a peering port.
        """
        host_cert = self.host_ca.generate_host_certificate(
            self.host_key, f"rly-node:{node_name}", principals=[node_name],
            valid_before=HOST_CERT_VALIDITY,
        )  # fmt: skip
        client_cert = self.host_ca.generate_user_certificate(
            self.host_key,
            f"rly-node:{node_name}",
            principals=[node_name],
            valid_after="-1m",
            valid_before=HOST_CERT_VALIDITY,
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=True,  # the device channel is a direct-tcpip open
            permit_pty=False,
            permit_user_rc=False,
        )
        return NodeIdentity(self.host_key, host_cert, client_cert)

    def user_certificate(
        self, *, session_id: str, username: str, principal: str
    ) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
        """A fresh key and a short-lived certificate for one device login."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        cert = self.user_ca.generate_user_certificate(
            key,
            f"rly:{session_id}:{username}",
            principals=[principal],
            valid_after="-1m",
            valid_before=f"+{USER_CERT_VALIDITY_MINUTES}m",
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=False,
            permit_pty=True,
            permit_user_rc=False,
        )
        return key, cert
