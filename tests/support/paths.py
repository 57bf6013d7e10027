"""Private directories for test servers."""

from __future__ import annotations

from pathlib import Path


def private_dir(parent: Path, base: str) -> Path:
    """Create and return a new 0700 directory `parent/base`, or `base-2`, `base-3`, ... if taken."""
    n = 1
    while True:
        path = parent / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            n += 1
            continue
        path.chmod(0o700)  # mkdir's mode is filtered by the umask
        return path
