"""A device behind a web firewall: a network namespace that reaches only a tinyproxy.

    fw = WebFirewall.create(workdir)            # namespace + veth pair, as root
    proxy = fw.proxy(user="dev", password="pw", connect_ports=[443])
    fw.run(processes, [...rly-client...])       # a process inside the namespace
    fw.close()                                  # processes, proxies, veth, namespace

The namespace's only route is the veth pair; the host end carries the
proxy's address, the relay listens on 127.0.0.1 of the host, which the
namespace cannot see. So the device reaches the relay only through the proxy.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.ports import free_port
from tests.support.procs import ManagedProcess, ProcessFactory

_SERIAL = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Proxy:
    """One tinyproxy instance listening on the firewall's host address."""

    host: str
    port: int
    process: ManagedProcess
    user: str = ""
    password: str = ""
    log_path: Path = field(default_factory=Path)

    def url(self, *, password: str | None = None) -> str:
        auth = (
            f"{self.user}:{self.password if password is None else password}@" if self.user else ""
        )
        return f"http://{auth}{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class WebFirewall:
    """A namespace whose one way out is an HTTP proxy on the host end of a veth pair."""

    name: str
    host_if: str
    host_ip: str
    ns_ip: str
    workdir: Path
    processes: ProcessFactory

    @classmethod
    def create(cls, workdir: Path) -> WebFirewall:
        n = (os.getpid() * 7 + next(_SERIAL)) % 250 + 1
        name, host_if, ns_if = f"rlyfw{os.getpid()}x{n}", f"rfh{n}p{os.getpid() % 9999}", "eth0"
        net = ipaddress.ip_network(f"10.{200 + n % 50}.{n}.0/30")
        host_ip, ns_ip = str(net[1]), str(net[2])
        fw = cls(name, host_if, host_ip, ns_ip, workdir, ProcessFactory(workdir))
        try:
            _ip("netns", "add", name)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", f"{host_if}n")
            _ip("link", "set", f"{host_if}n", "netns", name)
            _ip("netns", "exec", name, "ip", "link", "set", f"{host_if}n", "name", ns_if)
            _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
            _ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        except BaseException:
            fw.close()
            raise
        return fw

    def proxy(
        self,
        *,
        user: str = "",
        password: str = "",
        connect_ports: Sequence[int] = (),
        allow_hosts: Sequence[str] = (),
    ) -> Proxy:
        """Start a tinyproxy of our own on the host end (BasicAuth when user is given;
        with `allow_hosts`, every other destination host is refused: 403 Filtered)."""
        port = free_port(self.host_ip)
        tag = f"tinyproxy-{port}"
        log_path = self.workdir / f"{tag}.log"
        filtered: list[str] = []
        if allow_hosts:
            allowed = self.workdir / f"{tag}.allow"
            allowed.write_text("".join(f"^{re.escape(h)}$\n" for h in allow_hosts))
            filtered = [f'Filter "{allowed}"', "FilterDefaultDeny Yes", "FilterURLs Off"]
        lines = [
            f"Port {port}",
            f"Listen {self.host_ip}",
            "Timeout 600",
            "MaxClients 50",
            "LogLevel Info",
            f'LogFile "{log_path}"',
            f"Allow {self.ns_ip}",
            "DisableViaHeader Yes",
            *(f"ConnectPort {p}" for p in connect_ports),  # none: every port may be CONNECTed
            *filtered,
        ]
        if user:
            lines.append(f"BasicAuth {user} {password}")
        conf = self.workdir / f"{tag}.conf"
        conf.write_text("\n".join(lines) + "\n")
        proc = self.processes(["tinyproxy", "-d", "-c", str(conf)], name=tag)
        deadline = time.monotonic() + 10
        while not _listening(self.host_ip, port):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"tinyproxy did not start: {proc.output}")
            time.sleep(0.05)
        return Proxy(self.host_ip, port, proc, user, password, log_path)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        return self.processes(self.argv(argv), name=name, env=env)

    def close(self) -> None:
        self.processes.stop_all()
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)


def _listening(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def self_signed(
    workdir: Path, name: str, hosts: Sequence[str] = ("127.0.0.1",)
) -> tuple[Path, Path]:
    """A self-signed server certificate for `hosts` (cert.pem, key.pem 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    alt = [
        x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h)
        for h in hosts
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / f"{name}.pem", workdir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
