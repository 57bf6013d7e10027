"""rly-client runs on appliances: its import graph must stay free of the server side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = (
    "sqlalchemy",
    "fastapi",
    "starlette",
    "uvicorn",
    "relay",
    "tracker",
    "approval_portal",
    "core.models",
    "core.db",
    "rly",
)


def test_cli_import_pulls_no_server_modules() -> None:
    """Importing device_client.cli (and its run loop and target) loads no server package."""
    code = (
        "import sys, json, device_client.cli, device_client.runner, device_client.target;"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    bad = [name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []
    assert "device_client.cli" in loaded
