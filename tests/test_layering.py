"""The import arrows point one way: rly -> servers -> core; device_client stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("relay", "tracker", "approval_portal")


def imported_packages(package: str) -> set[tuple[str, str]]:
    """(file, top-level package) for every import in a package's modules."""
    found: set[tuple[str, str]] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(path.name, alias.name.split(".")[0]) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((path.name, node.module.split(".")[0]))
    return found


def test_core_imports_no_server_package() -> None:
    """core/ is shared by everything, so it may not depend on what sits on it."""
    bad = {(f, p) for f, p in imported_packages("core") if p in (*SERVERS, "rly", "device_client")}
    assert bad == set()


@pytest.mark.parametrize("package", SERVERS)
def test_servers_do_not_import_each_other_or_rly(package: str) -> None:
    """A server package imports core and never another server's internals or rly/."""
    others = {p for p in (*SERVERS, "rly", "device_client") if p != package}
    bad = {(f, p) for f, p in imported_packages(package) if p in others}
    assert bad == set()


def test_device_client_loads_no_server_code() -> None:
    """rly-client runs on appliances: importing it loads no SQLAlchemy, FastAPI or server code."""
    probe = (
        "import sys, device_client.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('sqlalchemy', 'fastapi', 'starlette', 'uvicorn', 'alembic', 'relay', 'tracker', "
        "'approval_portal', 'rly') or m in ('core.models', 'core.db', 'core.config')]\n"
        "print(','.join(sorted(bad)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == ""
