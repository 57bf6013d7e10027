"""The README's two commands need nothing but python3 (stock Debian 12: no `python`,
pip refused on the system interpreter, and no ensurepip without python3-venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

NO_ENSUREPIP_PYTHON3 = """#!/bin/sh
# Debian's python3 without python3-venv: `-m venv` fails unless pip is left out.
if [ "$1" = -m ] && [ "$2" = venv ] && [ "$3" != --without-pip ]; then
    echo "ensurepip is not available" >&2; exit 1
fi
exec {python} "$@"
"""


def test_readme_runs_the_relay_through_scripts_venv() -> None:
    """The README's relay command creates and uses ./.venv rather than a bare `python`."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    assert blocks[0] == "scripts/venv && .venv/bin/rly serve"
    assert blocks[1] == ".ci/run"
    assert "scripts/venv test" in (REPO_ROOT / ".ci/run").read_text()


def test_scripts_venv_bootstraps_pip_without_ensurepip(tmp_path: Path) -> None:
    """scripts/venv builds a venv with pip and installs the project when ensurepip is missing."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "scripts" / "venv", project / "scripts" / "venv")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "probe"\nversion = "0"\n[tool.setuptools]\npy-modules = ["probe"]\n'
    )
    (project / "probe.py").write_text("ANSWER = 42\n")
    shim = tmp_path / "bin"
    shim.mkdir()
    base_python = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    (shim / "python3").write_text(NO_ENSUREPIP_PYTHON3.format(python=base_python))
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([str(project / "scripts" / "venv")], env=env, check=True, timeout=300)
    out = subprocess.run(
        [str(project / ".venv/bin/python"), "-c", "import probe, pip; print(probe.ANSWER)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"
