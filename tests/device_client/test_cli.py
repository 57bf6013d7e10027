"""rly-client's command line: arguments, enroll, status and their exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from device_client.cli import main
from device_client.config import load_config, save_config
from device_client.state import ClientState, write_state
from device_client.target import fetch_sshd_host_key
from tests.device_client.test_config import make_config

CA = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
ENROLL_REPLY = {
    "device_id": "dev-7",
    "status": "pending",
    "relay_hosts": ["relay.example"],
    "relay_ports": [80, 2200],
    "relay_host_ca": CA,
    "user_ca": CA,
    "login_user": "root",
    "tunnel_mode": "persistent",
    "checkin_interval": 25.0,
}


@dataclass
class FakeTracker:
    """A canned-reply HTTP server standing in for the tracker's enroll endpoint."""

    url: str
    status: int = 200
    reply: dict[str, Any] = field(default_factory=lambda: dict(ENROLL_REPLY))
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@pytest.fixture
def tracker() -> Iterator[FakeTracker]:
    """Serve FakeTracker on a loopback port for one test."""
    holder: list[FakeTracker] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            fake = holder[0]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            fake.requests.append((self.path, json.loads(body)))
            data = json.dumps(fake.reply).encode()
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(FakeTracker(url=f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()


def _enroll(tracker: FakeTracker, config: Path, *extra: str) -> int:
    return main(
        [
            "enroll",
            "--tracker",
            tracker.url,
            "--token",
            "tok-secret",
            "--config",
            str(config),
            "--target-port",
            "9",
            *extra,
        ]
    )


def test_enroll_writes_private_config_and_key(
    tracker: FakeTracker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A successful enroll sends the device facts and writes key and config 0600."""
    config_path = tmp_path / "etc" / "client.toml"
    assert _enroll(tracker, config_path, "--hostname", "nas-1", "--serial", "S1") == 0
    path, body = tracker.requests[0]
    assert path == "/api/v1/enroll"
    assert (body["token"], body["hostname"], body["serial"]) == ("tok-secret", "nas-1", "S1")
    config = load_config(config_path)
    assert config.device_id == "dev-7"
    assert config.relay_ports == (80, 2200)
    assert (
        body["public_key"]
        == asyncssh.read_private_key(str(config.key_file)).export_public_key().decode().strip()
    )
    assert "target_host_key" not in body  # nothing listens on --target-port 9
    for private in (config_path, config.key_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_path.parent.stat().st_mode) == 0o700
    out = capsys.readouterr().out
    assert "dev-7" in out
    assert "pending" in out


def test_enroll_builtin_sends_its_host_key(tracker: FakeTracker, tmp_path: Path) -> None:
    """With --target builtin a host key is generated, kept 0600 and its public half sent."""
    assert _enroll(tracker, tmp_path / "client.toml", "--target", "builtin") == 0
    config = load_config(tmp_path / "client.toml")
    assert config.host_key_file is not None
    host_key = asyncssh.read_private_key(str(config.host_key_file))
    sent = tracker.requests[0][1]["target_host_key"]
    assert sent == host_key.export_public_key().decode().strip()
    assert stat.S_IMODE(config.host_key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("status", "reply", "message"),
    [
        (403, {"error": "token expired"}, "token expired"),
        (200, {"device_id": "x"}, "malformed reply"),
        (200, {**ENROLL_REPLY, "user_ca": "garbage"}, "'user_ca'"),
    ],
)
def test_enroll_failure_writes_nothing(
    tracker: FakeTracker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    status: int,
    reply: dict[str, Any],
    message: str,
) -> None:
    """A refused or malformed enroll exits 2 with one stderr line and writes no file."""
    tracker.status, tracker.reply = status, reply
    assert _enroll(tracker, tmp_path / "etc" / "client.toml") == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "tok-secret" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("token_args", [["--token", "t"], ["--token=-older-token"]])
def test_enroll_unreachable_tracker(
    token_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreachable tracker is a one-line error, exit 2, nothing written.

    `--token=-…` passes a token that starts with a dash (tokens made before the prefix)."""
    code = main(
        [
            "enroll",
            "--tracker",
            "http://127.0.0.1:9",
            *token_args,
            "--config",
            str(tmp_path / "c.toml"),
            "--target-port",
            "9",
        ]
    )
    assert code == 2
    assert "unreachable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["enroll", "--token", "t"],
        ["enroll", "--tracker", "http://x"],
        ["enroll", "--tracker", "http://x", "--token", "t", "--target", "telnet"],
        ["enroll", "--tracker", "http://x", "--token", "t", "--target-port", "ssh"],
        ["frobnicate"],
    ],
)
def test_argument_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Missing or invalid arguments are usage errors with exit status 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--tracker", "ftp://x"], ["--target-port", "0"]])
def test_bad_values_exit_2_before_contacting_anyone(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-HTTP tracker URL or impossible port fails before any request or file."""
    argv = [
        "enroll",
        "--tracker",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--config",
        str(tmp_path / "c.toml"),
        *args,
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("rly-client: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "status", "install-service"])
def test_commands_without_config_exit_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run, status and install-service name the missing config file and exit 2."""
    assert main([command, "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "missing.toml" in err
    assert "not found" in err


def test_config_env_variable_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config the path comes from RLY_CLIENT_CONFIG."""
    monkeypatch.setenv("RLY_CLIENT_CONFIG", str(tmp_path / "from-env.toml"))
    assert main(["status"]) == 2
    assert "from-env.toml" in capsys.readouterr().err


def test_run_help_documents_backoff_env(capsys: pytest.CaptureFixture[str]) -> None:
    """`rly-client run --help` mentions RLY_CLIENT_BACKOFF_CAP."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "RLY_CLIENT_BACKOFF_CAP" in capsys.readouterr().out


def _status(tmp_path: Path, state: ClientState | None) -> int:
    config = make_config(tmp_path)
    save_config(config, tmp_path / "client.toml")
    if state is not None:
        write_state(config.state_file, state)
    return main(["status", "--config", str(tmp_path / "client.toml")])


def test_status_running_with_tunnel_up_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A live pid with the tunnel up is status 0 and shows relay, port and check-in."""
    state = ClientState(
        pid=os.getpid(),
        started=0.0,
        config_path="x",
        last_checkin=1.0,
        checkin_result="ok",
        tunnel_state="up",
        relay="relay.example",
        port=2200,
        since=2.0,
    )
    assert _status(tmp_path, state) == 0
    out = capsys.readouterr().out
    assert "relay.example:2200" in out
    assert "ok" in out
    assert str(tmp_path / "client.toml") in out


@pytest.mark.parametrize(
    "state",
    [
        None,
        ClientState(pid=os.getpid(), started=0.0, config_path="x", tunnel_state="connecting"),
        ClientState(pid=2**22 + 1, started=0.0, config_path="x", tunnel_state="up"),
        ClientState(pid=os.getpid(), started=0.0, config_path="x", tunnel_state="up", stopped=5.0),
    ],
)
def test_status_not_running_or_no_tunnel_exits_3(tmp_path: Path, state: ClientState | None) -> None:
    """No state, no tunnel, a dead pid or a clean stop all give status 3."""
    assert _status(tmp_path, state) == 3


def test_fetch_sshd_host_key_returns_the_servers_key() -> None:
    """Enrollment learns the local SSH server's host key (ed25519 preferred)."""

    async def scenario() -> None:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        acceptor = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host_key])
        try:
            line = await fetch_sshd_host_key("127.0.0.1", acceptor.get_port())
        finally:
            acceptor.close()
        assert line == host_key.export_public_key().decode().strip()
        assert await fetch_sshd_host_key("127.0.0.1", 9) is None

    asyncio.run(scenario())


def test_status_with_an_unreachable_tracker_still_prints_every_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --tracker` with the tracker down says so on the status line and goes on."""
    config = make_config(tmp_path, tracker_url="http://127.0.0.1:9")
    key = asyncssh.generate_private_key("ssh-ed25519")
    config.key_file.write_bytes(key.export_private_key())
    save_config(config, tmp_path / "client.toml")
    assert main(["status", "--config", str(tmp_path / "client.toml"), "--tracker"]) == 3
    out = capsys.readouterr().out
    assert "tracker:       http://127.0.0.1:9\n" in out
    assert "status:        unknown (tracker http://127.0.0.1:9 unreachable" in out
    assert "tunnel:        down: rly-client is not running" in out
