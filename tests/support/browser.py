"""Headless Chromium through Playwright's sync API, using Debian's /usr/bin/chromium.

Playwright's sync API keeps its own asyncio loop marked as running in the
thread that started it, so `asyncio.run()` fails there afterwards. The
conftest hides that loop from tests that do not use the browser; a test that
uses the browser must not run asyncio code itself (drive servers through
subprocesses, HTTP or ssh instead).
"""

from __future__ import annotations

import asyncio.events
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def browser_session() -> Iterator[Browser]:
    """Launch Chromium and close it (and Playwright) on exit."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def hidden_running_loop() -> Iterator[None]:
    """Hide an event loop left marked as running in this thread (Playwright's) while inside."""
    loop = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(None)
    try:
        yield
    finally:
        asyncio.events._set_running_loop(loop)
