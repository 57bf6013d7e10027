"""A real OpenSSH server on a loopback port, as a test peer (a device's sshd).

Everything lives in a 0700 directory and is named by absolute path: a relative
path silently breaks sshd's re-exec'd child. `StrictModes no` lets key files
sit under /tmp. Password authentication is off; log in with a key listed in
`authorized_keys` or a certificate signed by a key in `trusted_user_ca_keys`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncssh

from tests.support.paths import private_dir
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess, ProcessExited

SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"


class OpenSshd:
    """`/usr/sbin/sshd -D -e` on 127.0.0.1 with its own host key and config."""

    def __init__(
        self,
        workdir: Path,
        *,
        trusted_user_ca_keys: Sequence[str] = (),
        authorized_keys: Sequence[str] = (),
        permit_root_login: str = "yes",
        options: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare the directory; `options` are sshd_config keywords that win over the defaults."""
        self.dir = private_dir(workdir, "sshd")
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        host_key.write_private_key(self.host_key_path)
        self.host_key_path.chmod(0o600)
        self.host_key_public: str = host_key.export_public_key().decode().strip()
        self.config_path = self.dir / "sshd_config"
        self.config_path.write_text(
            self._config(trusted_user_ca_keys, authorized_keys, permit_root_login, options)
        )
        self.port = 0
        self.process: ManagedProcess | None = None

    def _config(
        self,
        ca_keys: Sequence[str],
        authorized_keys: Sequence[str],
        permit_root_login: str,
        options: Mapping[str, str] | None,
    ) -> str:
        settings: dict[str, str] = {
            "ListenAddress": "127.0.0.1",
            "HostKey": str(self.host_key_path),
            "PidFile": "none",
            "UsePAM": "no",
            "StrictModes": "no",
            "PermitRootLogin": permit_root_login,
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PubkeyAuthentication": "yes",
            "AuthorizedKeysFile": self._write_lines("authorized_keys", authorized_keys),
            "LogLevel": "VERBOSE",
            "MaxStartups": "100",
            "Subsystem": "sftp internal-sftp",
        }
        if ca_keys:
            settings["TrustedUserCAKeys"] = self._write_lines("trusted_user_ca_keys", ca_keys)
        settings.update(options or {})
        return "".join(f"{key} {value}\n" for key, value in settings.items())

    def _write_lines(self, name: str, lines: Sequence[str]) -> str:
        if not lines:
            return "none"
        path = self.dir / name
        path.write_text("".join(line.strip() + "\n" for line in lines))
        return str(path)

    def start(self, timeout: float = 10.0, attempts: int = 5) -> Self:
        """Start sshd on a free port, retrying when another process took the port first."""
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        for _ in range(attempts):
            port = free_port()
            proc = ManagedProcess(
                [SSHD, "-D", "-e", "-f", str(self.config_path), "-p", str(port)],
                workdir=self.dir,
                name="sshd",
            ).start()
            try:
                proc.wait_for_line(
                    rf"Server listening on 127\.0\.0\.1 port {port}\b", timeout, stream="stderr"
                )
            except (ProcessExited, TimeoutError):
                proc.stop()
                if "Address already in use" in proc.stderr:
                    continue
                raise
            self.port, self.process = port, proc
            return self
        raise RuntimeError(f"sshd found no free port in {attempts} attempts")

    @property
    def known_hosts_line(self) -> str:
        """A known_hosts line pinning this server's host key."""
        return f"[127.0.0.1]:{self.port} {self.host_key_public}"

    @property
    def log(self) -> str:
        """sshd's log so far (it logs to stderr with -e)."""
        return self.process.stderr if self.process else ""

    def ssh_command(
        self,
        *command: str,
        user: str = "root",
        identity_file: Path | None = None,
        certificate_file: Path | None = None,
    ) -> list[str]:
        """An OpenSSH `ssh` argv that logs in here non-interactively and runs `command`."""
        argv = [SSH, "-F", "/dev/null", "-p", str(self.port), "-o", "BatchMode=yes"]
        argv += [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]
        if identity_file is not None:
            argv += ["-o", "IdentitiesOnly=yes", "-i", str(identity_file)]
        if certificate_file is not None:
            argv += ["-o", f"CertificateFile={certificate_file}"]
        return [*argv, f"{user}@127.0.0.1", *command]

    def stop(self) -> None:
        """Stop sshd (sessions already running end when their clients disconnect)."""
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Self:
        return self if self.process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SshdFactory:
    """Starts OpenSshd servers (the `sshd_factory` fixture); `stop_all()` stops them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[OpenSshd] = []

    def __call__(
        self,
        *,
        trusted_user_ca_keys: Sequence[str] = (),
        authorized_keys: Sequence[str] = (),
        permit_root_login: str = "yes",
        options: Mapping[str, str] | None = None,
    ) -> OpenSshd:
        """Start and return an OpenSshd (see its constructor for the arguments)."""
        server = OpenSshd(
            self.workdir,
            trusted_user_ca_keys=trusted_user_ca_keys,
            authorized_keys=authorized_keys,
            permit_root_login=permit_root_login,
            options=options,
        )
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        """Stop every server started here."""
        while self.servers:
            self.servers.pop().stop()
