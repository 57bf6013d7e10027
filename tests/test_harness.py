"""Tests of the test harness itself; they need OpenSSH, Chromium and PostgreSQL but no rly code."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncssh
import psycopg
import pytest
from playwright.sync_api import Browser, Page

from tests.support.browser import hidden_running_loop
from tests.support.pg import database_exists, fresh_database
from tests.support.ports import port_accepts, wait_for_port
from tests.support.procs import ManagedProcess, ProcessExited, ProcessFactory
from tests.support.rly_server import REPO_ROOT, RlyServer
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician

PAGE = '<!doctype html><title>t</title><main><button type="button">Approve</button></main>'


def _user_key(directory: Path) -> tuple[asyncssh.SSHKey, Path]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = directory / "id_ed25519"
    key.write_private_key(path)
    path.chmod(0o600)
    return key, path


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_sshd_accepts_authorized_user_key(sshd_factory: SshdFactory, tmp_path: Path) -> None:
    """OpenSshd lets a real `ssh` client in with a key listed in its authorized_keys."""
    key, key_path = _user_key(tmp_path)
    sshd = sshd_factory(authorized_keys=[key.export_public_key().decode()])
    result = subprocess.run(
        sshd.ssh_command("true", identity_file=key_path), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr + sshd.log
    assert "Accepted publickey for root" in sshd.log


def test_sshd_refuses_unlisted_key(sshd_factory: SshdFactory, tmp_path: Path) -> None:
    """OpenSshd refuses a key that is neither authorized nor certified (password auth is off)."""
    _, key_path = _user_key(tmp_path)
    sshd = sshd_factory()
    result = subprocess.run(
        sshd.ssh_command("true", identity_file=key_path), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 255


def test_sshd_trusts_user_ca_certificate(sshd_factory: SshdFactory, tmp_path: Path) -> None:
    """A certificate from the TrustedUserCAKeys CA logs in as root, and sshd logs its key id."""
    ca = asyncssh.generate_private_key("ssh-ed25519")
    user_key, key_path = _user_key(tmp_path)
    cert = ca.generate_user_certificate(
        user_key, "rly:test", principals=["root"], valid_before="+5m"
    )
    cert_path = tmp_path / "id_ed25519-cert.pub"
    cert.write_certificate(cert_path)
    sshd = sshd_factory(trusted_user_ca_keys=[ca.export_public_key().decode()])
    argv = sshd.ssh_command("id", "-u", identity_file=key_path, certificate_file=cert_path)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr + sshd.log
    assert result.stdout.strip() == "0"
    assert "rly:test" in sshd.log


def test_technician_pty_resize_reaches_remote_shell(
    sshd_factory: SshdFactory, tmp_path: Path
) -> None:
    """Technician drives an interactive ssh session whose PTY size follows resize()."""
    key, key_path = _user_key(tmp_path)
    sshd = sshd_factory(authorized_keys=[key.export_public_key().decode()])
    with Technician(
        sshd.port, user="root", password=None, identity_file=key_path, args=["-tt"], command=["sh"]
    ) as tech:
        tech.sendline("stty size")
        tech.expect(r"24 80")
        tech.resize(40, 100)
        tech.sendline("stty size")
        tech.expect(r"40 100")
        tech.sendline("exit 3")
        assert tech.expect_eof() == 3
    assert not tech.alive


def test_process_stopped_at_teardown_when_test_fails(tmp_path: Path) -> None:
    """process_factory kills its processes, children included, even when the test using it fails."""
    pid_file = tmp_path / "pids"
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(f"""
        def test_fails(process_factory):
            proc = process_factory(["bash", "-c", "sleep 300 & echo $! ; wait"])
            child = proc.wait_for_line(r"^\\d+$").group(0)
            open({str(pid_file)!r}, "w").write(f"{{proc.pid}} {{child}}")
            assert False, "deliberate"
        """)
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert "1 failed" in result.stdout, result.stdout + result.stderr
    assert "--- stdout:" in result.stdout  # the failed test's report shows the process output
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    assert not any(_pid_alive(p) for p in pids)


def test_stop_escalates_to_sigkill_for_the_group(process_factory: ProcessFactory) -> None:
    """stop() SIGKILLs a process group that ignores SIGTERM once the grace period ends."""
    script = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = process_factory([sys.executable, "-c", script], name="stubborn")
    child = int(proc.wait_for_line(r"^child (\d+)$").group(1))
    assert proc.stop(timeout=0.5) == -9
    assert not proc.running
    # SIGKILL is delivered asynchronously: on a loaded machine the child may need a moment
    deadline = time.monotonic() + 2
    while _pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _pid_alive(child)


def test_wait_for_line_reads_successive_lines(process_factory: ProcessFactory) -> None:
    """wait_for_line returns successive matching lines, then reports an exit with the output."""
    proc = process_factory(["sh", "-c", "echo n=1; echo n=2; echo oops >&2; exit 4"])
    assert proc.wait_for_line(r"n=(\d)").group(1) == "1"
    assert proc.wait_for_line(r"n=(\d)").group(1) == "2"
    assert proc.wait_for_line("oops", stream="stderr").group(0) == "oops"
    with pytest.raises(ProcessExited, match="oops"):
        proc.wait_for_line(r"n=3", timeout=5)
    assert proc.wait() == 4


def test_managed_process_context_manager_stops(tmp_path: Path) -> None:
    """Leaving a ManagedProcess's with-block stops it, and wait_for_port sees its port."""
    with ManagedProcess(
        [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], workdir=tmp_path
    ) as proc:
        port = int(proc.wait_for_line(r"port (\d+)").group(1))
        wait_for_port("127.0.0.1", port, timeout=10)
    assert proc.returncode is not None
    assert not port_accepts("127.0.0.1", port)


def test_browser_finds_element_by_role(
    process_factory: ProcessFactory, page: Page, tmp_path: Path
) -> None:
    """The browser fixture loads a page from a local server and finds a button by its role."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE)
    server = process_factory(
        [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(site)]
    )
    port = int(server.wait_for_line(r"port (\d+)").group(1))
    page.goto(f"http://127.0.0.1:{port}/")
    assert page.get_by_role("button", name="Approve").count() == 1


def test_asyncio_runs_beside_the_browser(browser: Browser) -> None:
    """asyncio.run works while Playwright's loop is hidden, and Playwright still works after."""
    page = browser.new_page()
    page.set_content(PAGE)
    with hidden_running_loop():
        assert asyncio.run(asyncio.sleep(0, result=7)) == 7
    assert page.get_by_role("button").count() == 1
    page.close()


def test_pg_url_is_a_fresh_database(pg_url: str) -> None:
    """pg_url names an existing, freshly created database that accepts connections."""
    assert pg_url.startswith("postgresql+psycopg://")
    with psycopg.connect(pg_url.replace("+psycopg", ""), connect_timeout=5) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    assert str(row[0]).startswith("rly_test_")


def test_fresh_database_is_dropped_on_exit() -> None:
    """fresh_database creates a database and drops it when the block ends."""
    try:
        with fresh_database() as url:
            name = url.rsplit("/", 1)[1]
            assert database_exists(name)
    except psycopg.OperationalError as exc:
        if os.environ.get("RLY_TEST_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"PostgreSQL is unreachable: {exc}")
    assert not database_exists(name)


FAKE_RLY = """
import json, signal, socket, sys, time, tomllib
args = sys.argv[1:]
if args[0] != "serve":
    print(json.dumps(args))
    sys.exit(0)
cfg = tomllib.load(open(args[args.index("--config") + 1], "rb"))
def bind(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s.getsockname()[1], s
tech = bind(cfg["relay"]["technician_port"])
devices = [bind(p) for p in cfg["relay"]["device_ports"]]
http = bind(cfg["http"]["port"])
print(f"rly: technician ssh on 127.0.0.1:{tech[0]}")
for port, _ in devices:
    print(f"rly: device ssh on 127.0.0.1:{port}")
print(f"rly: http on 127.0.0.1:{http[0]}")
print(f"rly: portal http://127.0.0.1:{http[0]}  (public URL http://localhost:8000)")
print("rly: ready", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(300)
"""


def test_rly_server_reads_startup_lines_and_restarts(tmp_path: Path) -> None:
    """RlyServer parses start-up lines, passes --config to the CLI, restarts on the same ports."""
    fake = tmp_path / "fake_rly.py"
    fake.write_text(FAKE_RLY)
    server = RlyServer(
        tmp_path, config={"relay": {"device_ports": [0, 0]}}, command=[sys.executable, str(fake)]
    )
    with server:
        assert server.data_dir.stat().st_mode & 0o777 == 0o700
        assert len(server.device_ports) == 2
        first = (server.technician_port, server.device_ports, server.http_port)
        assert port_accepts("127.0.0.1", server.technician_port)
        assert server.base_url == f"http://127.0.0.1:{server.http_port}"
        assert (
            server.rebase("http://localhost:8000/approve/abc") == f"{server.base_url}/approve/abc"
        )
        cli = server.run_cli("audit", "--limit", "5")
        assert (
            cli.stdout.strip() == f'["audit", "--limit", "5", "--config", "{server.config_path}"]'
        )
        server.restart()
        assert (server.technician_port, server.device_ports, server.http_port) == first
        assert server.kill() == -9
    assert not port_accepts("127.0.0.1", first[0])
