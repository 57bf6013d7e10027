"""Secret files are private: written 0600 (dir 0700), and a readable one stops `rly serve`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.support.procs import ProcessExited
from tests.support.rly_server import RlyFactory, RlyServer


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret_files(data_dir: Path) -> list[Path]:
    keys = [p for p in (data_dir / "keys").iterdir() if not p.name.endswith((".pub", "-cert.pub"))]
    return [*keys, data_dir / "rly.sqlite3"]


@pytest.fixture
def stopped(rly_factory: RlyFactory) -> RlyServer:
    """A data dir that `rly serve` created once, with the server stopped again."""
    server = rly_factory()
    server.stop()
    return server


def test_secret_files_are_written_private(stopped: RlyServer) -> None:
    """Keys and the database (TOTP secrets, password hashes) are 0600 in 0700 directories."""
    data_dir = stopped.data_dir
    assert _mode(data_dir) == 0o700 and _mode(data_dir / "keys") == 0o700
    files = _secret_files(data_dir)
    assert len(files) >= 3
    assert {str(p): _mode(p) for p in files} == {str(p): 0o600 for p in files}


def _refuses(server: RlyServer, path: Path) -> None:
    with pytest.raises(ProcessExited):
        server.start(timeout=20)
    assert server.process is not None and server.process.returncode == 2
    assert path.name in server.output, server.output
    assert "Traceback" not in server.output


@pytest.mark.parametrize("name", ["host_ca", "user_ca", "host_key"])
def test_readable_key_file_stops_start(stopped: RlyServer, name: str) -> None:
    """A private key file readable by group or others makes `rly serve` refuse to start."""
    path = stopped.data_dir / "keys" / name
    assert path.exists(), sorted(p.name for p in path.parent.iterdir())
    path.chmod(0o644)
    _refuses(stopped, path)


def test_readable_database_file_stops_start(stopped: RlyServer) -> None:
    """The SQLite file holds TOTP secrets: readable by others, `rly serve` refuses to start."""
    path = stopped.data_dir / "rly.sqlite3"
    path.chmod(0o644)
    _refuses(stopped, path)
